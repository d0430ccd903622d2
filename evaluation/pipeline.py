"""A merge job from spec to report: capture calibration, merge (choosing α on validation data when
asked), evaluate the published model.

Phases, each reported through the same progress callback as the merge itself (``ProgressEvent``):

* ``calibration``: for each expert whose ``calibration`` gives ``data``, run its fine-tuned model on
  the samples and capture every linear layer's input Gram matrix (cached by checkpoint sha256,
  data sha256, samples and max_length);
* ``lambda search``: consensus with ``"lambda": "auto"``: each expert's TALL-mask λ, chosen on its
  task's validation split before the merge (``Pipeline.choose_tall_lambdas``);
* the engine's phases (``inspect``, ``prepass``, ``merge``, ``alpha search``, ``rescale``,
  ``diagnostics``, ``finalize``, ``publish``);
* ``evaluation``: score the merged model (read back from where it was published, so the numbers
  are those of the published bytes) and, with ``baselines``, the base and each expert (cached).

Task data and the base model are loaded before anything is merged, so bad data or a checkpoint
that cannot run fails the job in seconds, not after the merge.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from merging.alpha import AlphaScore, search_alpha
from merging import engine
from merging.engine import MergeResult, ProgressEvent, TaskVector
from merging.errors import CancelledError
from merging.io.checkpoint import open_checkpoint
from merging.io.sources import IOConfig, default_cache_dir, redact_uri
from merging.io.hashing import sha256_file
from merging.registry import get_method
from merging.spec import MergeSpec, TaskSpec, load_spec


@dataclass
class TaskData:
    spec: TaskSpec
    name: str
    evaluator: str
    test: tuple[list[str], list[int]]
    validation: tuple[list[str], list[int]] | None


@dataclass
class PipelineResult:
    merge: MergeResult
    evaluation: dict[str, Any] | None = None
    calibration: list[dict[str, Any]] | None = None
    timings: dict[str, float] = field(default_factory=dict)


class _Emit:
    def __init__(self, progress: Callable[[ProgressEvent], Any] | None, should_cancel: Callable[[], bool] | None):
        self.progress, self.should_cancel = progress, should_cancel

    def __call__(self, phase: str, done: int, total: int, key: str | None = None, message: str | None = None) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise CancelledError("cancelled")
        if self.progress is not None:
            self.progress(ProgressEvent(phase, done, total, key, message))


def checkpoint_sha256(uri: str, cfg: IOConfig, revision: str | None = None, label: str = "checkpoint") -> str:
    """One digest over the sha256 of every data file of a checkpoint (the identity used by caches)."""
    ck = open_checkpoint(uri, label, cfg, revision)
    try:
        h = hashlib.sha256()
        for name, loc in sorted(ck.data_files().items()):
            h.update(name.encode() + b"\0" + sha256_file(loc.local_path(), cfg.cache_dir).encode() + b"\n")
        return h.hexdigest()
    finally:
        ck.close()


class _Cache:
    """Small JSON/safetensors results under ``<cache>/eval``; written atomically, keyed by content hashes."""

    def __init__(self, root: str):
        self.root = root

    def path(self, kind: str, key: str, ext: str) -> str:
        d = os.path.join(self.root, kind)
        os.makedirs(d, exist_ok=True)
        return os.path.join(d, f"{key}.{ext}")

    def get_json(self, kind: str, key: str) -> Any | None:
        try:
            with open(self.path(kind, key, "json"), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def put_json(self, kind: str, key: str, value: Any) -> None:
        p = self.path(kind, key, "json")
        tmp = f"{p}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(value, f)
        os.replace(tmp, p)


# The official TALL-mask λ grid (tall_masks: construct_tall_mask); ALGORITHMS.md §5.
TALL_LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.6)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class Pipeline:
    def __init__(self, spec: MergeSpec, cfg: IOConfig, emit: _Emit, cache_dir: str | None):
        self.spec, self.cfg, self.emit = spec, cfg, emit
        self.cache = _Cache(os.path.join(cache_dir or default_cache_dir(), "eval"))
        self.ev = spec.evaluation
        self.device = spec.options.device
        self._dirs: dict[str, str] = {}
        self._shas: dict[str, str] = {}
        self.tasks: list[TaskData] = []
        self.heads: dict[str, torch.Tensor] = {}  # zero-shot heads, computed once with the base model
        self.base_model = None   # the untouched base: zero-shot heads and base scores
        self._work = None        # the base architecture that candidate states are copied into
        self._seq_models: dict[str, Any] = {}  # sequence_classification: each task's expert (its head)
        # model id -> (the model, the state dict last copied into it): zero-shot tasks share one model, so
        # an α candidate's weights are copied in once, not once per task (the dict is kept, so ids are not reused)
        self._state_in: dict[int, tuple[Any, dict]] = {}
        self._base_state: dict[str, torch.Tensor] | None = None
        self.curve: list[AlphaScore] = []
        self.chosen: AlphaScore | None = None
        self.expert_val: dict[str, float] = {}
        self.tall: dict[str, Any] | None = None  # the consensus λ search, when params.lambda is "auto"

    # -- helpers ------------------------------------------------------------------------------
    def model_dir(self, uri: str, revision: str | None = None) -> str:
        from evaluation.models import local_model_dir
        if uri not in self._dirs:
            self._dirs[uri] = local_model_dir(uri, self.cfg, revision)
        return self._dirs[uri]

    def sha(self, uri: str, revision: str | None = None, label: str = "checkpoint") -> str:
        if uri not in self._shas:
            self._shas[uri] = checkpoint_sha256(uri, self.cfg, revision, label)
        return self._shas[uri]

    def load(self, uri: str, revision: str | None = None):
        from evaluation.models import load_model
        adapter = self.ev.adapter if self.ev is not None else "hf_transformers"
        return load_model(self.model_dir(uri, revision), adapter=adapter, device=self.device)

    def expert_ref(self, name: str):
        return self.spec.experts[self.spec.expert_names().index(name)]

    # -- phase 0: inputs that can be checked before merging ----------------------------------------
    def load_tasks(self) -> None:
        from evaluation.data import load_rows, read_labels, read_texts
        if self.ev is None:
            return
        for i, t in enumerate(self.ev.tasks):
            def split(ref, what):
                if ref is None:
                    return None
                rows = load_rows(ref.uri, self.cfg, format=ref.format, limit=t.max_samples)
                if not rows:
                    from evaluation.errors import DataError
                    raise DataError(f"evaluation.tasks.{i}.{what}: {redact_uri(ref.uri)} holds no rows")
                return read_texts(rows, t.text_field, uri=ref.uri), read_labels(rows, t.label_field, t.labels, uri=ref.uri)
            self.tasks.append(TaskData(t, t.name or t.expert, self.ev.evaluator_of(t), split(t.test, "test"),
                                       split(t.validation, "validation")))
        self.base_model = self.load(self.spec.base.uri, self.spec.base.revision)
        from evaluation.evaluators import zero_shot_head
        for task in self.tasks:
            if task.evaluator == "text_zero_shot":
                self.heads[task.name] = zero_shot_head(self.base_model, task.spec.labels, task.spec.prompt,
                                                       batch_size=self.ev.batch_size, max_length=self.ev.max_length)

    # -- phase 1: calibration ------------------------------------------------------------------------
    def capture_calibration(self) -> tuple[dict[str, str], list[dict]]:
        todo = [(name, e) for name, e in zip(self.spec.expert_names(), self.spec.experts)
                if e.calibration is not None and e.calibration.data is not None]
        files, records = {}, []
        if not todo:
            return files, records
        from evaluation.capture import calibration_cache_key, capture_gram, save_calibration
        from evaluation.data import data_sha256, load_rows, read_texts
        for i, (name, e) in enumerate(todo):
            self.emit("calibration", i, len(todo), message=f"expert {name!r}")
            c = e.calibration
            key = calibration_cache_key(self.sha(e.uri, e.revision, f"expert {name!r}"), data_sha256(c.data.uri, self.cfg),
                                        c.samples, c.max_length)
            path = self.cache.path("calibration", key, "safetensors")
            cached = os.path.exists(path)
            if not cached:
                rows = load_rows(c.data.uri, self.cfg, format=c.data.format, limit=c.samples)
                texts = read_texts(rows, c.text_field, uri=c.data.uri)
                model = self.load(e.uri, e.revision)
                save_calibration(capture_gram(model, texts, max_length=c.max_length), path)
                del model
            files[name] = path
            records.append({"expert": name, "data": redact_uri(c.data.uri), "samples": c.samples,
                            "max_length": c.max_length, "cache_key": key, "cached": cached})
        self.emit("calibration", len(todo), len(todo))
        return files, records

    # -- scoring -----------------------------------------------------------------------------------
    def _score(self, model, task: TaskData, split: str) -> float:
        from evaluation.evaluators import accuracy_classification, accuracy_zero_shot
        texts, labels = task.test if split == "test" else task.validation
        kw = {"batch_size": self.ev.batch_size, "max_length": self.ev.max_length}
        if task.evaluator == "text_zero_shot":
            return accuracy_zero_shot(model, self.heads[task.name], texts, labels, **kw)
        return accuracy_classification(model, texts, labels, **kw)

    def _head_keys(self, keys) -> set[str]:
        return {k for k in keys if any(fnmatch.fnmatchcase(k, p) for p in self.ev.heads)}

    def _task_model(self, task: TaskData, backbone: dict[str, torch.Tensor]):
        """The model that scores ``task`` with the weights ``backbone`` (a full state): the base
        architecture for zero-shot, the task's expert for sequence classification, whose head
        tensors are kept (``evaluation.heads``)."""
        if task.evaluator == "text_zero_shot":
            if self._work is None:
                self._work = self.load(self.spec.base.uri, self.spec.base.revision)
            model = self._work
        else:
            model = self._seq_models.get(task.name)
            if model is None:
                e = self.expert_ref(task.spec.expert)
                model = self._seq_models[task.name] = self.load(e.uri, e.revision)
        last = self._state_in.get(id(model))
        if last is None or last[1] is not backbone:
            heads = self._head_keys(backbone) if task.evaluator == "sequence_classification" else set()
            model.set_state({k: v for k, v in backbone.items() if k not in heads})
            self._state_in[id(model)] = (model, backbone)
        return model

    def _cached_score(self, which: str, uri: str, revision: str | None, task: TaskData, split: str, build) -> float:
        """Baseline accuracies (base, experts) are cached by checkpoint, data and evaluator settings."""
        from evaluation.data import data_sha256
        ref = task.spec.test if split == "test" else task.spec.validation
        key = _digest(self.sha(uri, revision, which), data_sha256(ref.uri, self.cfg), task.evaluator,
                      task.spec.model_dump(mode="json", exclude={"name", "expert", "test", "validation", "evaluator"}),
                      self.sha(self.spec.base.uri, self.spec.base.revision, "base") if task.evaluator == "text_zero_shot" else None,
                      self.ev.max_length, sorted(self.ev.heads), split)
        hit = self.cache.get_json("scores", key)
        if isinstance(hit, dict) and isinstance(hit.get("accuracy"), (int, float)):
            return float(hit["accuracy"])
        acc = build()
        self.cache.put_json("scores", key, {"accuracy": acc, "task": task.name, "split": split, "model": which})
        return acc

    def base_score(self, task: TaskData, split: str) -> float:
        def build():
            if task.evaluator == "text_zero_shot":
                return self._score(self.base_model, task, split)
            # the base backbone under this task's head
            return self._score(self._task_model(task, self.base_model_state()), task, split)
        return self._cached_score("base", self.spec.base.uri, self.spec.base.revision, task, split, build)

    def base_model_state(self) -> dict[str, torch.Tensor]:
        if self._base_state is None:
            ck = open_checkpoint(self.spec.base.uri, "base", self.cfg, self.spec.base.revision)
            try:
                self._base_state = {k: ck.read(k) for k in ck.keys()}
            finally:
                ck.close()
        return self._base_state

    def expert_score(self, task: TaskData, split: str) -> float:
        e = self.expert_ref(task.spec.expert)

        def build():
            # a fresh copy: for zero-shot the expert's encoder under the frozen base head, for
            # classification the expert with its own head
            return self._score(self.load(e.uri, e.revision), task, split)
        return self._cached_score(f"expert {task.spec.expert!r}", e.uri, e.revision, task, split, build)

    # -- phase 1b: the consensus λ search (the TALL-mask step) --------------------------------------
    def choose_tall_lambdas(self) -> list[float]:
        """Consensus ``"lambda": "auto"``, the official TALL-mask step (ALGORITHMS.md §5; the
        ``tall_mask`` method of the TALL-masks code): for each expert t and each λ in
        ``TALL_LAMBDAS``, the model θ0 + m_t(λ) ⊙ Σ_s τ_s, with m_t(λ) = |τ_t| > λ·|Σ_s τ_s − τ_t|,
        is scored on the validation split of t's task(s); t keeps the λ that scores best, the
        smallest on ties (the official code takes the first maximum over λ in ascending order).
        Holds about five model-sized arrays (the base, the sum, one expert's task vector and
        |Σ_s τ_s − τ_t|, the candidate), where the α search holds three: evaluation needs whole
        models anyway."""
        keys = [p.key for p in engine.preflight(self.spec, self.cfg).plan if p.action == "merge"]
        dtype = getattr(torch, self.spec.options.compute_dtype)
        full = dict(self.base_model_state())  # copied keys (passthrough, buffers) stay the base's
        base = {k: full[k].to(dtype) for k in keys}
        names = self.spec.expert_names()

        def task_vector(name: str) -> dict[str, torch.Tensor]:
            e = self.expert_ref(name)
            ck = open_checkpoint(e.uri, f"expert {name!r}", self.cfg, e.revision)
            try:
                return {k: ck.read(k).to(dtype) - base[k] for k in keys}
            finally:
                ck.close()

        steps = len(names) * (1 + len(TALL_LAMBDAS))
        total = {k: torch.zeros_like(v) for k, v in base.items()}
        for i, name in enumerate(names):
            self.emit("lambda search", i, steps, message=f"summing task vectors: expert {name!r}")
            for k, tau in task_vector(name).items():
                total[k] += tau
        done = len(names)
        chosen, curves = {}, {}
        for name in names:
            tau = task_vector(name)
            others = {k: (total[k] - tau[k]).abs() for k in keys}  # |Σ_s τ_s − τ_t|
            tasks = [t for t in self.tasks if t.spec.expert == name]
            curve = {}
            for lam in TALL_LAMBDAS:
                self.emit("lambda search", done, steps, message=f"expert {name!r}: λ = {lam}")
                state = {**full, **{k: base[k] + torch.where(tau[k].abs() > lam * others[k], total[k], 0.0)
                                    for k in keys}}
                curve[lam] = sum(self._score(self._task_model(t, state), t, "validation") for t in tasks) / len(tasks)
                done += 1
            chosen[name] = max(curve, key=curve.get)  # first maximum in ascending λ
            curves[name] = curve
            del tau, others
        self.emit("lambda search", steps, steps)
        self.tall = {"grid": list(TALL_LAMBDAS), "chosen_lambda": chosen,
                     "validation_accuracy": {n: [{"lambda": lam, "accuracy": a} for lam, a in c.items()]
                                             for n, c in curves.items()}}
        return [chosen[n] for n in names]

    # -- phase 2: α search -------------------------------------------------------------------------
    def choose_alpha(self, tv: TaskVector) -> float:
        search = get_method(self.spec.method).alpha_search
        self.expert_val = {t.name: self.expert_score(t, "validation") for t in self.tasks}
        taus = {k: tv.read(k).float() for k in tv.keys()}
        full = dict(self.base_model_state())  # copied keys (passthrough, buffers) stay the base's
        bases = {k: full[k].float() for k in tv.keys()}
        budget = len(search.grid) if search.kind == "grid" else search.max_iter + 2

        def evaluate(alpha: float) -> AlphaScore:
            self.emit("alpha search", len(self.curve), budget, message=f"α = {alpha:.4g}")
            state = {**full, **tv.state(alpha, taus, bases)}
            per_task = {}
            for t in self.tasks:
                per_task[t.name] = self._score(self._task_model(t, state), t, "validation")
            score = AlphaScore(alpha, sum(per_task.values()) / len(per_task),
                               sum(_ratio(per_task[n], self.expert_val[n]) for n in per_task) / len(per_task), per_task)
            self.curve.append(score)
            return score

        self.chosen, _ = search_alpha(search, evaluate)
        self.search_kind = search.describe()
        return self.chosen.alpha

    # -- phase 3: evaluation of the published model -----------------------------------------------
    def evaluate(self, model_uri: str) -> dict[str, Any]:
        ck = open_checkpoint(model_uri, "merged model", self.cfg)
        try:
            merged = {k: ck.read(k) for k in ck.keys()}
        finally:
            ck.close()
        n = len(self.tasks) * (3 if self.ev.baselines else 1)
        done = 0
        rows = []
        for t in self.tasks:
            self.emit("evaluation", done, n, message=f"task {t.name!r}")
            acc = self._score(self._task_model(t, merged), t, "test")
            done += 1
            row: dict[str, Any] = {"task": t.name, "expert": t.spec.expert, "evaluator": t.evaluator,
                                   "n_test": len(t.test[1]), "merged": acc}
            if self.ev.baselines:
                self.emit("evaluation", done, n, message=f"task {t.name!r}: base")
                row["base"] = self.base_score(t, "test")
                done += 1
                self.emit("evaluation", done, n, message=f"task {t.name!r}: expert")
                row["expert_accuracy"] = self.expert_score(t, "test")
                done += 1
                row["normalized"] = _ratio(acc, row["expert_accuracy"])
                gap = row["expert_accuracy"] - row["base"]
                row["nai"] = (acc - row["base"]) / gap if gap != 0 else None
            rows.append(row)
        self.emit("evaluation", n, n)

        def mean(field_: str):
            vals = [r[field_] for r in rows if r.get(field_) is not None]
            return sum(vals) / len(vals) if vals else None
        out: dict[str, Any] = {
            "format": "submerge.evaluation/0",
            "evaluator": self.ev.evaluator, "adapter": self.ev.adapter, "model": redact_uri(model_uri),
            "tasks": rows,
            "average": {k: mean(k) for k in (("merged", "base", "expert_accuracy", "normalized", "nai")
                                              if self.ev.baselines else ("merged",))},
            "definitions": {"normalized": "merged / expert accuracy", "nai": "(merged − base) / (expert − base)",
                            "base": "the base model (zero-shot) on the task", "expert_accuracy": "the task's expert on its own task"},
        }
        if self.tall is not None:
            out["lambda_search"] = self.tall
        if self.curve:
            out["alpha_search"] = {
                "search": self.search_kind, "chosen_alpha": self.chosen.alpha,
                "expert_validation_accuracy": self.expert_val,
                "curve": [{"alpha": s.alpha, "avg_accuracy": s.avg_accuracy, "avg_normalized": s.avg_normalized,
                           "per_task": s.per_task} for s in self.curve],
            }
        return out


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0


def run_pipeline(spec: MergeSpec | dict, progress: Callable[[ProgressEvent], Any] | None = None, *,
                 io: IOConfig | None = None, should_cancel: Callable[[], bool] | None = None,
                 cache_dir: str | None = None) -> PipelineResult:
    """Run a job: calibration capture, merge (with α search when ``params.alpha`` is "auto") and
    evaluation. Without calibration data, evaluation or α search this is exactly ``merge()``."""
    import time
    spec = load_spec(spec)
    cfg = io or IOConfig()
    emit = _Emit(progress, should_cancel)
    p = Pipeline(spec, cfg, emit, cache_dir)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if spec.evaluation is not None:
        emit("evaluation setup", 0, 1, message="loading task data and the base model")
        p.load_tasks()
        emit("evaluation setup", 1, 1)
        timings["evaluation_setup"] = time.perf_counter() - t
    t = time.perf_counter()
    calibration_files, calibration = p.capture_calibration()
    if calibration:
        timings["calibration"] = time.perf_counter() - t
    if spec.searched_params:  # consensus "lambda": "auto": chosen per expert before the merge, which sees the list
        t = time.perf_counter()
        spec = p.spec = spec.model_copy(update={"params": {**spec.params, "lambda": p.choose_tall_lambdas()}})
        timings["lambda_search"] = time.perf_counter() - t
    t = time.perf_counter()
    result = engine.merge(spec, progress, io=cfg, should_cancel=should_cancel, calibration_files=calibration_files or None,
                   choose_alpha=p.choose_alpha if spec.alpha_auto else None)
    timings["merge"] = time.perf_counter() - t
    evaluation = None
    if spec.evaluation is not None:
        t = time.perf_counter()
        evaluation = p.evaluate(result.output_uri)
        timings["evaluation"] = time.perf_counter() - t
        evaluation["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    return PipelineResult(result, evaluation, calibration or None, timings)

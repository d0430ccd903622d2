"""The job program: a merge job from spec to report. Capture calibration, merge (choosing α on
validation data when asked), evaluate the published model. ``run_pipeline`` is what the worker
(``workers.tasks.run_job``) and ``submerge merge`` run; the scoring itself, task data and the
cached baselines are the task pool's (``evaluation.scoring.Scorer``).

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

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from evaluation.capture import calibration_cache_key, capture_gram, save_calibration
from evaluation.data import data_sha256, load_rows, read_texts
from evaluation.scoring import Scorer
from merging import MergeResult, ProgressEmitter, ProgressEvent, TaskVector, engine, get_method, preflight
from merging.alpha import AlphaScore, search_alpha
from merging.io.checkpoint import iter_tensors, read_tensors
from merging.io.sources import IOConfig
from merging.spec import MergeSpec, load_spec
from workers.redact import redact_uri


@dataclass
class PipelineResult:
    merge: MergeResult
    evaluation: dict[str, Any] | None = None
    calibration: list[dict[str, Any]] | None = None
    timings: dict[str, float] = field(default_factory=dict)


# The official TALL-mask λ grid (tall_masks: construct_tall_mask); ALGORITHMS.md §5.
TALL_LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.6)


class Pipeline:
    def __init__(self, spec: MergeSpec, cfg: IOConfig, emit: ProgressEmitter, cache_dir: str | None):
        self.spec, self.cfg, self.emit = spec, cfg, emit
        self.scorer = Scorer(spec, cfg, cache_dir)  # task data, models, heads, cached baselines
        self.ev = spec.evaluation
        self.curve: list[AlphaScore] = []
        self.chosen: AlphaScore | None = None
        self.expert_val: dict[str, float] = {}
        self.tall: dict[str, Any] | None = None  # the consensus λ search, when params.lambda is "auto"

    # -- phase 1: calibration ------------------------------------------------------------------------
    def capture_calibration(self) -> tuple[dict[str, str], list[dict]]:
        todo = [(name, e) for name, e in zip(self.spec.expert_names(), self.spec.experts)
                if e.calibration is not None and e.calibration.data is not None]
        files, records = {}, []
        if not todo:
            return files, records
        sc = self.scorer
        for i, (name, e) in enumerate(todo):
            self.emit("calibration", i, len(todo), message=f"expert {name!r}")
            c = e.calibration
            key = calibration_cache_key(sc.sha(e.uri, e.revision, f"expert {name!r}"), data_sha256(c.data.uri, self.cfg),
                                        c.samples, c.max_length)
            path = sc.cache.path("calibration", key, "safetensors")
            cached = os.path.exists(path)
            if not cached:
                rows = load_rows(c.data.uri, self.cfg, format=c.data.format, limit=c.samples)
                texts = read_texts(rows, c.text_field, uri=c.data.uri)
                model = sc.load(e.uri, e.revision)
                save_calibration(capture_gram(model, texts, max_length=c.max_length), path)
                del model
            files[name] = path
            records.append({"expert": name, "data": redact_uri(c.data.uri), "samples": c.samples,
                            "max_length": c.max_length, "cache_key": key, "cached": cached})
        self.emit("calibration", len(todo), len(todo))
        return files, records

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
        keys = [p.key for p in preflight(self.spec, self.cfg).plan if p.action == "merge"]
        dtype = getattr(torch, self.spec.options.compute_dtype)
        full = dict(self.scorer.base_model_state())  # copied keys (passthrough, buffers) stay the base's
        base = {k: full[k].to(dtype) for k in keys}
        names = self.spec.expert_names()

        def task_vector(name: str) -> dict[str, torch.Tensor]:
            e = self.scorer.expert_ref(name)
            return {k: t.to(dtype) - base[k] for k, t in iter_tensors(e.uri, f"expert {name!r}", self.cfg, e.revision, keys)}

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
            tasks = [t for t in self.scorer.tasks if t.spec.expert == name]
            curve = {}
            for lam in TALL_LAMBDAS:
                self.emit("lambda search", done, steps, message=f"expert {name!r}: λ = {lam}")
                state = {**full, **{k: base[k] + torch.where(tau[k].abs() > lam * others[k], total[k], 0.0)
                                    for k in keys}}
                curve[lam] = sum(self.scorer.score(self.scorer.task_model(t, state), t, "validation") for t in tasks) / len(tasks)
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
        self.expert_val = {t.name: self.scorer.expert_score(t, "validation") for t in self.scorer.tasks}
        taus = {k: tv.read(k).float() for k in tv.keys()}
        full = dict(self.scorer.base_model_state())  # copied keys (passthrough, buffers) stay the base's
        bases = {k: full[k].float() for k in tv.keys()}
        budget = len(search.grid) if search.kind == "grid" else search.max_iter + 2

        def evaluate(alpha: float) -> AlphaScore:
            self.emit("alpha search", len(self.curve), budget, message=f"α = {alpha:.4g}")
            state = {**full, **tv.state(alpha, taus, bases)}
            per_task = {}
            for t in self.scorer.tasks:
                per_task[t.name] = self.scorer.score(self.scorer.task_model(t, state), t, "validation")
            score = AlphaScore(alpha, sum(per_task.values()) / len(per_task),
                               sum(_ratio(per_task[n], self.expert_val[n]) for n in per_task) / len(per_task), per_task)
            self.curve.append(score)
            return score

        self.chosen, _ = search_alpha(search, evaluate)
        self.search_kind = search.describe()
        return self.chosen.alpha

    # -- phase 3: evaluation of the published model -----------------------------------------------
    def evaluate(self, model_uri: str) -> dict[str, Any]:
        merged = read_tensors(model_uri, "merged model", self.cfg)
        n = len(self.scorer.tasks) * (3 if self.ev.baselines else 1)
        done = 0
        rows = []
        for t in self.scorer.tasks:
            self.emit("evaluation", done, n, message=f"task {t.name!r}")
            acc = self.scorer.score(self.scorer.task_model(t, merged), t, "test")
            done += 1
            row: dict[str, Any] = {"task": t.name, "expert": t.spec.expert, "evaluator": t.evaluator,
                                   "n_test": len(t.test[1]), "merged": acc}
            if self.ev.baselines:
                self.emit("evaluation", done, n, message=f"task {t.name!r}: base")
                row["base"] = self.scorer.base_score(t, "test")
                done += 1
                self.emit("evaluation", done, n, message=f"task {t.name!r}: expert")
                row["expert_accuracy"] = self.scorer.expert_score(t, "test")
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
                 cache_dir: str | None = None, memory_budget: int | None = None) -> PipelineResult:
    """Run a job: calibration capture, merge (with α search when ``params.alpha`` is "auto") and
    evaluation. Without calibration data, evaluation or α search this is exactly ``merge()``.
    ``memory_budget``: the worker's cap on the merge's memory (``merging.memory``)."""
    spec = load_spec(spec)
    cfg = io or IOConfig()
    emit = ProgressEmitter(progress, should_cancel, cancel_message="cancelled")
    p = Pipeline(spec, cfg, emit, cache_dir)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if spec.evaluation is not None:
        emit("evaluation setup", 0, 1, message="loading task data and the base model")
        p.scorer.load_tasks()
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
                   choose_alpha=p.choose_alpha if spec.alpha_auto else None, memory_budget=memory_budget)
    timings["merge"] = time.perf_counter() - t
    evaluation = None
    if spec.evaluation is not None:
        t = time.perf_counter()
        evaluation = p.evaluate(result.output_uri)
        timings["evaluation"] = time.perf_counter() - t
        evaluation["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    return PipelineResult(result, evaluation, calibration or None, timings)

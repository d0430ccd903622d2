"""Scoring checkpoints on a spec's evaluation tasks, with cached baselines.

``Scorer`` holds what a job's evaluation needs across its phases: the task data (read and checked
before anything is merged), the models that score each task (the base architecture for evaluators
that run on the base, each task's expert for those that keep the expert's head: see
``evaluation.evaluators``), the frozen class heads, and the checkpoints' identities (sha256 over
their data files) that key the cache. Baseline accuracies (the base model and each expert on each
task) are cached under ``<cache>/eval/scores`` by checkpoint, data and evaluator settings, so a
second job with the same experts and tasks does not score them again.

The job program (``workers.pipeline``) drives it: validation scores during the λ and α searches,
test scores of the published model and the baselines afterwards.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

from evaluation.data import data_sha256, load_rows, read_labels, read_texts
from evaluation.errors import DataError
from evaluation.evaluators import get_evaluator
from evaluation.models import load_model, local_model_dir
from merging.io.checkpoint import open_checkpoint, read_tensors
from merging.io.hashing import sha256_file
from merging.io.sources import IOConfig, default_cache_dir, redact_uri
from merging.spec import MergeSpec, TaskSpec


@dataclass
class TaskData:
    spec: TaskSpec
    name: str
    evaluator: str
    test: tuple[list[str], list[int]]
    validation: tuple[list[str], list[int]] | None


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


class ResultCache:
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


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class Scorer:
    def __init__(self, spec: MergeSpec, cfg: IOConfig, cache_dir: str | None):
        self.spec, self.cfg = spec, cfg
        self.cache = ResultCache(os.path.join(cache_dir or default_cache_dir(), "eval"))
        self.ev = spec.evaluation
        self.device = spec.options.device
        self._dirs: dict[str, str] = {}
        self._shas: dict[str, str] = {}
        self.tasks: list[TaskData] = []
        self.heads: dict[str, torch.Tensor] = {}  # frozen class heads (zero-shot), computed once with the base model
        self.base_model = None   # the untouched base: frozen heads and base scores
        self._work = None        # the base architecture that candidate states are copied into
        self._seq_models: dict[str, Any] = {}  # evaluators with the expert's head: each task's expert
        # model id -> (the model, the state dict last copied into it): zero-shot tasks share one model, so
        # an α candidate's weights are copied in once, not once per task (the dict is kept, so ids are not reused)
        self._state_in: dict[int, tuple[Any, dict]] = {}
        self._base_state: dict[str, torch.Tensor] | None = None

    # -- checkpoints and models ---------------------------------------------------------------------
    def model_dir(self, uri: str, revision: str | None = None) -> str:
        if uri not in self._dirs:
            self._dirs[uri] = local_model_dir(uri, self.cfg, revision)
        return self._dirs[uri]

    def sha(self, uri: str, revision: str | None = None, label: str = "checkpoint") -> str:
        if uri not in self._shas:
            self._shas[uri] = checkpoint_sha256(uri, self.cfg, revision, label)
        return self._shas[uri]

    def load(self, uri: str, revision: str | None = None):
        adapter = self.ev.adapter if self.ev is not None else "hf_transformers"
        return load_model(self.model_dir(uri, revision), adapter=adapter, device=self.device)

    def expert_ref(self, name: str):
        return self.spec.experts[self.spec.expert_names().index(name)]

    def base_model_state(self) -> dict[str, torch.Tensor]:
        if self._base_state is None:
            self._base_state = read_tensors(self.spec.base.uri, "base", self.cfg, self.spec.base.revision)
        return self._base_state

    # -- task data: read and checked before anything is merged --------------------------------------
    def load_tasks(self) -> None:
        if self.ev is None:
            return
        for i, t in enumerate(self.ev.tasks):
            def split(ref, what):
                if ref is None:
                    return None
                rows = load_rows(ref.uri, self.cfg, format=ref.format, limit=t.max_samples)
                if not rows:
                    raise DataError(f"evaluation.tasks.{i}.{what}: {redact_uri(ref.uri)} holds no rows")
                return read_texts(rows, t.text_field, uri=ref.uri), read_labels(rows, t.label_field, t.labels, uri=ref.uri)
            self.tasks.append(TaskData(t, t.name or t.expert, self.ev.evaluator_of(t), split(t.test, "test"),
                                       split(t.validation, "validation")))
        self.base_model = self.load(self.spec.base.uri, self.spec.base.revision)
        for task in self.tasks:
            head = get_evaluator(task.evaluator).head(self.base_model, task.spec, batch_size=self.ev.batch_size,
                                                      max_length=self.ev.max_length)
            if head is not None:
                self.heads[task.name] = head

    # -- scoring -------------------------------------------------------------------------------------
    def score(self, model, task: TaskData, split: str) -> float:
        """Accuracy of ``model`` on ``task``'s ``split`` ("test" or "validation")."""
        texts, labels = task.test if split == "test" else task.validation
        return get_evaluator(task.evaluator).accuracy(model, self.heads.get(task.name), texts, labels,
                                                      batch_size=self.ev.batch_size, max_length=self.ev.max_length)

    def _head_keys(self, keys) -> set[str]:
        return {k for k in keys if any(fnmatch.fnmatchcase(k, p) for p in self.ev.heads)}

    def task_model(self, task: TaskData, backbone: dict[str, torch.Tensor]):
        """The model that scores ``task`` with the weights ``backbone`` (a full state): the base
        architecture for evaluators that run on the base (zero-shot), else the task's expert, whose
        head tensors are kept (``evaluation.heads``)."""
        on_base = get_evaluator(task.evaluator).on_base
        if on_base:
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
            heads = set() if on_base else self._head_keys(backbone)
            model.set_state({k: v for k, v in backbone.items() if k not in heads})
            self._state_in[id(model)] = (model, backbone)
        return model

    def _cached_score(self, which: str, uri: str, revision: str | None, task: TaskData, split: str,
                      build: Callable[[], float]) -> float:
        """Baseline accuracies (base, experts) are cached by checkpoint, data and evaluator settings."""
        ref = task.spec.test if split == "test" else task.spec.validation
        on_base = get_evaluator(task.evaluator).on_base
        key = _digest(self.sha(uri, revision, which), data_sha256(ref.uri, self.cfg), task.evaluator,
                      task.spec.model_dump(mode="json", exclude={"name", "expert", "test", "validation", "evaluator"}),
                      self.sha(self.spec.base.uri, self.spec.base.revision, "base") if on_base else None,
                      self.ev.max_length, sorted(self.ev.heads), split)
        hit = self.cache.get_json("scores", key)
        if isinstance(hit, dict) and isinstance(hit.get("accuracy"), (int, float)):
            return float(hit["accuracy"])
        acc = build()
        self.cache.put_json("scores", key, {"accuracy": acc, "task": task.name, "split": split, "model": which})
        return acc

    def base_score(self, task: TaskData, split: str) -> float:
        def build():
            if get_evaluator(task.evaluator).on_base:
                return self.score(self.base_model, task, split)
            # the base backbone under this task's head
            return self.score(self.task_model(task, self.base_model_state()), task, split)
        return self._cached_score("base", self.spec.base.uri, self.spec.base.revision, task, split, build)

    def expert_score(self, task: TaskData, split: str) -> float:
        e = self.expert_ref(task.spec.expert)

        def build():
            # a fresh copy: for zero-shot the expert's encoder under the frozen base head, for
            # classification the expert with its own head
            return self.score(self.load(e.uri, e.revision), task, split)
        return self._cached_score(f"expert {task.spec.expert!r}", e.uri, e.revision, task, split, build)


__all__ = ["ResultCache", "Scorer", "TaskData", "checkpoint_sha256"]

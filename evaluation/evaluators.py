"""Evaluators: zero-shot text classification with a frozen head, and sequence classification.

``text_zero_shot`` follows the CLIP merging benchmarks: the class head is the embeddings of
one prompt per class name, computed ONCE with the base model and kept frozen while the merged
weights change; logits are ``scale · cos(embedding(text), head row)``.
``sequence_classification`` takes the argmax of the model's own classification head.

The evaluator names are the spec's (``merging.spec.EVALUATORS``, what ``evaluation.evaluator``
accepts); ``REGISTRY`` maps each to its ``Evaluator`` here, and ``get_evaluator(name)`` is how
the rest of the code reaches one. Importing this module fails if the two ever differ.
"""
from __future__ import annotations

from typing import Sequence

import torch

from evaluation.errors import DataError, EvaluationError
from merging.spec import EVALUATORS, TaskSpec


def zero_shot_head(model, labels: Sequence[str], prompt: str = "{label}", *, batch_size: int = 32,
                   max_length: int = 128) -> torch.Tensor:
    """(C, d) float32: ``model.embed(prompt.format(label=name))`` for each class name (unit rows)."""
    if not labels:
        raise EvaluationError("zero-shot evaluation needs at least one class name")
    try:
        texts = [prompt.format(label=name) for name in labels]
    except (KeyError, IndexError, ValueError) as e:
        raise DataError(f"prompt {prompt!r}: cannot fill it in ({type(e).__name__}: {e}); "
                        "the only placeholder is {label}") from None
    return model.embed(texts, batch_size=batch_size, max_length=max_length)


def zero_shot_logits(model, head: torch.Tensor, texts: Sequence[str], *, scale: float = 30.0, batch_size: int = 32,
                     max_length: int = 128) -> torch.Tensor:
    """(N, C) float32: ``scale · cos(embedding(text), head row)``."""
    if head.ndim != 2 or head.shape[0] < 1:
        raise EvaluationError(f"zero-shot head must be (classes, dim), got shape {list(head.shape)}")
    emb = model.embed(texts, batch_size=batch_size, max_length=max_length)
    if emb.shape[1] != head.shape[1]:
        raise EvaluationError(f"zero-shot head has dimension {head.shape[1]}, the model embeds into {emb.shape[1]}")
    h = torch.nn.functional.normalize(head.detach().to("cpu", torch.float32), dim=-1)
    return scale * (emb @ h.mT)


def _accuracy(pred: torch.Tensor, labels: Sequence[int], n_classes: int, what: str) -> float:
    if len(labels) != pred.shape[0]:
        raise EvaluationError(f"{what}: {pred.shape[0]} texts but {len(labels)} labels")
    if pred.shape[0] == 0:
        raise EvaluationError(f"{what}: no examples to evaluate")
    target = torch.as_tensor(list(labels), dtype=torch.long)
    bad = ((target < 0) | (target >= n_classes)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise EvaluationError(f"{what}: label {int(target[i])} of example {i + 1} is outside the {n_classes} classes")
    return float((pred == target).double().mean())


def accuracy_zero_shot(model, head: torch.Tensor, texts: Sequence[str], labels: Sequence[int], **kw) -> float:
    """Top-1 accuracy of ``zero_shot_logits`` (keyword arguments are passed on to it)."""
    if len(texts) != len(labels):
        raise EvaluationError(f"zero-shot accuracy: {len(texts)} texts but {len(labels)} labels")
    logits = zero_shot_logits(model, head, texts, **kw)
    return _accuracy(logits.argmax(dim=1), labels, head.shape[0], "zero-shot accuracy")


def accuracy_classification(model, texts: Sequence[str], labels: Sequence[int], **kw) -> float:
    """Top-1 accuracy of the argmax of ``model.classify`` (keyword arguments are passed on to it)."""
    if len(texts) != len(labels):
        raise EvaluationError(f"classification accuracy: {len(texts)} texts but {len(labels)} labels")
    logits = model.classify(texts, **kw)
    return _accuracy(logits.argmax(dim=1), labels, logits.shape[1], "classification accuracy")


class Evaluator:
    """How one kind of task is scored.

    ``on_base``: True when the base architecture runs every task of this kind, against a class
    head the untouched base model computes once (``head``); False when each task runs on its own
    expert, whose classification head (the tensors ``evaluation.heads`` names) stays the expert's
    while the backbone's weights change."""

    name: str
    on_base: bool

    def head(self, base_model, task: TaskSpec, *, batch_size: int, max_length: int) -> torch.Tensor | None:
        """The frozen class head of ``task``, computed with the base model (None: the model has its own)."""
        return None

    def accuracy(self, model, head: torch.Tensor | None, texts: Sequence[str], labels: Sequence[int], *,
                 batch_size: int, max_length: int) -> float:
        raise NotImplementedError


class TextZeroShot(Evaluator):
    name, on_base = "text_zero_shot", True

    def head(self, base_model, task: TaskSpec, *, batch_size: int, max_length: int) -> torch.Tensor:
        return zero_shot_head(base_model, task.labels, task.prompt, batch_size=batch_size, max_length=max_length)

    def accuracy(self, model, head, texts, labels, *, batch_size: int, max_length: int) -> float:
        return accuracy_zero_shot(model, head, texts, labels, batch_size=batch_size, max_length=max_length)


class SequenceClassification(Evaluator):
    name, on_base = "sequence_classification", False

    def accuracy(self, model, head, texts, labels, *, batch_size: int, max_length: int) -> float:
        return accuracy_classification(model, texts, labels, batch_size=batch_size, max_length=max_length)


REGISTRY: dict[str, Evaluator] = {e.name: e for e in (TextZeroShot(), SequenceClassification())}
if tuple(REGISTRY) != EVALUATORS:
    raise ImportError(f"evaluation.evaluators.REGISTRY {tuple(REGISTRY)} does not implement exactly the spec's "
                      f"evaluators (merging.spec.EVALUATORS {EVALUATORS})")


def get_evaluator(name: str) -> Evaluator:
    try:
        return REGISTRY[name]
    except KeyError:
        raise EvaluationError(f"unknown evaluator {name!r} (known: {', '.join(REGISTRY)})") from None


__all__ = ["EVALUATORS", "REGISTRY", "Evaluator", "get_evaluator", "zero_shot_head", "zero_shot_logits", "accuracy_zero_shot",
           "accuracy_classification"]

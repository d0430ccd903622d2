"""Errors of the evaluation package: ``merging.errors`` subclasses with stable codes, so the
CLI prints them as one line and the service returns them as they are."""
from __future__ import annotations

from merging.errors import InputError, MergeError


class ModelLoadError(InputError):
    """A checkpoint cannot be run as a model (config, tokenizer, weights or keys at fault).

    Messages name the directory or URI and the key or file at fault.
    """

    code = "model_load_error"


class DataError(InputError):
    """Task data cannot be used. Messages name the URI, the row (1-based line) and the field."""

    code = "invalid_task_data"


class EvaluationError(MergeError):
    """An evaluation could not be computed (mismatched inputs, no data, ...)."""

    code = "evaluation_failed"


__all__ = ["ModelLoadError", "DataError", "EvaluationError"]

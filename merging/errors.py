"""Errors raised by the merging library.

Every error carries a machine-readable ``code`` and a message that names the field, tensor,
expert or URI at fault, so the CLI can print one line and the service can return it as-is.
"""
from __future__ import annotations


class MergeError(Exception):
    """Base class. ``code`` is stable and documented; ``message`` is for people."""

    code = "merge_error"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.field = field

    def __str__(self) -> str:  # one line, always
        return self.message.replace("\n", " ")


class SpecError(MergeError):
    """The job spec is invalid (unknown method/parameter, value out of range, ...)."""

    code = "invalid_spec"


class MemoryBudgetError(MergeError):
    """A tensor that its method needs whole would take more memory than the budget allows."""

    code = "memory_budget_exceeded"


class InputError(MergeError):
    """A checkpoint or calibration input cannot be used (unreadable, corrupt, mismatched, NaN)."""

    code = "invalid_input"


class UnreadableURIError(InputError):
    code = "unreadable_uri"


class AccessDeniedError(InputError):
    """An input the service's policy refuses: a file outside the allowed roots (symlinks
    resolved), or an http(s) request, redirect hop or resolved address it does not allow."""

    code = "uri_not_allowed"


class IncompatibleCheckpointsError(InputError):
    code = "incompatible_checkpoints"


class NonFiniteInputError(InputError):
    code = "non_finite_input"


class UnsafePickleError(InputError):
    code = "unsafe_pickle"


class CorruptCheckpointError(InputError):
    code = "corrupt_checkpoint"


class CalibrationError(InputError):
    code = "missing_calibration"


class OutputError(MergeError):
    code = "output_error"


class CancelledError(MergeError):
    """Raised from inside the merge when the progress callback asks to stop."""

    code = "cancelled"

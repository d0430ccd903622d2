"""Progress of a job: the events a caller's callback receives, and the one emitter that sends them.

The emitter is also where a job is cancelled: it asks ``should_cancel`` before every event, and
the engine emits one per tensor, so a cancel request stops a merge within one tensor's work. The
job program (calibration, λ and α searches, evaluation) reports its own phases through the same
emitter, to the same callback.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from merging.errors import CancelledError


@dataclass
class ProgressEvent:
    phase: str  # inspect | prepass i/n | merge | alpha search | rescale | diagnostics | finalize | publish | done
    done: int
    total: int
    key: str | None = None
    message: str | None = None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


ProgressCallback = Callable[[ProgressEvent], Any]


class ProgressEmitter:
    """``emit(phase, done, total, key=None, message=None)``: raise ``CancelledError`` (with
    ``cancel_message``) when ``should_cancel()`` says so, else send a ``ProgressEvent`` to
    ``callback``. Either may be None."""

    def __init__(self, callback: ProgressCallback | None = None, should_cancel: Callable[[], bool] | None = None, *,
                 cancel_message: str = "merge cancelled"):
        self.callback = callback
        self.should_cancel = should_cancel
        self.cancel_message = cancel_message

    def __call__(self, phase: str, done: int, total: int, key: str | None = None, message: str | None = None) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise CancelledError(self.cancel_message)
        if self.callback is not None:
            self.callback(ProgressEvent(phase, done, total, key, message))

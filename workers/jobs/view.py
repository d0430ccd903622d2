"""The public view of a job: what the API returns for a job and its events, and what a webhook
delivers (``job_out`` without the spec). Every stored string passes the redaction on the way out
(``workers.redact``). The API's other response models are in service/schemas.py."""
from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, Field

from workers.jobs.models import Job, JobEvent, utcnow
from workers.redact import redact_obj, redact_spec, redact_text

Status = Literal["queued", "running", "succeeded", "failed", "cancelling", "cancelled"]


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable code (merging error codes, worker_lost, time_limit, ...).")
    message: str
    field: str | None = Field(None, description="Dotted path of the offending spec field, when there is one.")


class Progress(BaseModel):
    phase: str | None = Field(None, description=(
        "evaluation setup | calibration | lambda search | inspect | prepass i/n | merge | alpha search | rescale | "
        "diagnostics | finalize | publish | evaluation | done"))
    done: int = Field(0, description="Steps done in the current phase (tensors, experts, α candidates or scoring steps).")
    total: int = Field(0, description="Steps in the current phase.")
    fraction: float = Field(0.0, description="done / total of the current phase (1.0 when finished).")
    eta_seconds: float | None = Field(None, description="Estimated seconds left in the current phase.")


class Links(BaseModel):
    self: str
    events: str
    report: str
    artifacts: str
    cancel: str


class JobOut(BaseModel):
    id: str
    status: Status
    method: str
    phase: str | None = None
    progress: Progress
    attempts: int = Field(description="Attempts started so far (a retried job has more than one).")
    max_attempts: int
    created_at: dt.datetime
    updated_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    duration_seconds: float | None = None
    error: ErrorInfo | None = None
    result: dict[str, Any] | None = Field(None, description=(
        "On success: model_uri, report_uri, artifacts [{path, size, sha256, uri}], manifest (merge.json without the per-tensor list)."))
    requested_output: dict[str, Any] | None = Field(None, description=(
        "The spec's own output section as submitted; the service publishes to its storage instead (see docs/SERVICE.md)."))
    spec: dict[str, Any] = Field(description="The spec as run (output.uri set to the job's storage location).")
    links: Links


class EventOut(BaseModel):
    at: dt.datetime
    type: str = Field(description="queued | started | phase | retry | cancel_requested | finished | webhook_delivered | webhook_failed")
    data: dict[str, Any] | None = None


def _iso(t: dt.datetime | None) -> dt.datetime | None:
    return t.replace(tzinfo=dt.timezone.utc) if t is not None and t.tzinfo is None else t


def progress_of(job: Job) -> Progress:
    done, total = job.progress_done or 0, job.progress_total or 0
    finished = job.status == "succeeded"
    fraction = 1.0 if finished else (done / total if total else 0.0)
    eta = None
    if job.status in ("running", "cancelling") and job.phase_started_at and 0 < done < total:
        elapsed = (utcnow() - job.phase_started_at).total_seconds()
        eta = round(max(0.0, elapsed / done * (total - done)), 1)
    return Progress(phase=job.phase, done=done, total=total, fraction=round(fraction, 4), eta_seconds=eta)


def job_out(job: Job, prefix: str = "/v1") -> JobOut:
    base = f"{prefix}/merges/{job.id}"
    error = ErrorInfo(code=job.error_code, message=redact_text(job.error_message) or "") if job.error_code else None
    return JobOut(
        id=job.id, status=job.status, method=job.method, phase=job.phase, progress=progress_of(job),
        attempts=job.attempts, max_attempts=job.max_attempts,
        created_at=_iso(job.created_at), updated_at=_iso(job.updated_at), started_at=_iso(job.started_at),
        finished_at=_iso(job.finished_at), duration_seconds=job.duration_seconds, error=error, result=redact_obj(job.result),
        requested_output=redact_obj(job.requested_output), spec=redact_spec(job.spec),
        links=Links(self=base, events=f"{base}/events", report=f"{base}/report", artifacts=f"{base}/artifacts",
                    cancel=f"{base}:cancel"))


def event_out(e: JobEvent) -> EventOut:
    return EventOut(at=_iso(e.at), type=e.type, data=redact_obj(e.data))


__all__ = ["ErrorInfo", "EventOut", "JobOut", "Links", "Progress", "Status", "event_out", "job_out", "progress_of"]

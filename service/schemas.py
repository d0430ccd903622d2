"""Response models of the REST API (the request body is merging.spec.MergeSpec itself).

A job and its events are shown as the job system's public view (``workers.jobs.view``, which the
webhooks deliver too); this module adds the API's own bodies around it."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from workers.jobs.view import ErrorInfo, EventOut, JobOut, Links, Progress, Status, event_out, job_out, progress_of


class ErrorBody(BaseModel):
    error: ErrorInfo


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(None, description="Pass as ?cursor= for the next (older) page; null on the last page.")


class EventList(BaseModel):
    items: list[EventOut]


class ArtifactOut(BaseModel):
    path: str
    size: int
    sha256: str
    uri: str = Field(description="Where the file lives in the service's storage.")
    url: str = Field(description="Download route (streams with Range support, or redirects to a presigned URL).")


class ArtifactList(BaseModel):
    items: list[ArtifactOut]


class ValidationReport(BaseModel):
    valid: bool
    error: ErrorInfo | None = None
    summary: dict[str, Any] | None = Field(None, description=(
        "Inputs, tensor counts, roles and copied tensors when valid; the memory plan: the budget, the workers, "
        "the estimated peak bytes, the largest job and the tensors merged in row blocks; and `cost`: the estimated "
        "wall time in seconds (`estimated_wall_s`, with `parts_s` and the cost model's machine and date), or null "
        "with the `reason` when no cost model is fitted for the device or method."))


class MethodList(BaseModel):
    items: list[dict[str, Any]]


__all__ = ["ArtifactList", "ArtifactOut", "ErrorBody", "ErrorInfo", "EventList", "EventOut", "JobList", "JobOut", "Links",
           "MethodList", "Progress", "Status", "ValidationReport", "event_out", "job_out", "progress_of"]

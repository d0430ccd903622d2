"""/v1/merges: submit, validate, read, list, cancel, events, report, artifacts."""
from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import uuid
from collections import Counter
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from pydantic import ValidationError
from starlette.convertors import Convertor, register_url_convertor

from merging import preflight
from merging.errors import MergeError
from merging.spec import MergeSpec
from service.dependencies import DispatcherDep, SettingsDep, StorageDep, StoreDep, TenantDep
from service.errors import ApiError, not_found, spec_error
from service.limits import MAX_JSON_DEPTH, json_depth_exceeds
from service.schemas import (ArtifactList, ArtifactOut, ErrorBody, ErrorInfo, EventList, JobList, JobOut, ValidationReport,
                             event_out, job_out)
from workers.dispatch import send
from workers.jobs.models import STATUSES
from workers.jobs.store import IdempotencyConflict
from workers.policy import PolicyError, admit_spec, job_io_config
from workers.redact import redact_obj, redact_text, redact_uri
from workers.storage import Storage

router = APIRouter(prefix="/v1", tags=["merges"])

_ERROR_JSON = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
SPEC_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/MergeSpec"}}},
                             "description": "A merging.spec.MergeSpec. `output` may be left out: the service publishes to its own "
                                            "storage ({storage}/{job_id}/model); `output.uri`, if given, is recorded as requested_output."},
             # the spec body is read by _body, not by FastAPI, so its errors are declared here
             "responses": {
                 "413": {"description": "Request body larger than SUBMERGE_MAX_REQUEST_BYTES", "content": _ERROR_JSON},
                 "415": {"description": "Content-Type is not application/json", "content": _ERROR_JSON}}}
ERRORS = {401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 422: {"model": ErrorBody}}
# application/json, or a structured-syntax JSON type (application/merge-spec+json); parameters such as
# charset are allowed. Anything else is refused: a web page can POST text/plain (or no content type)
# cross-origin without a CORS preflight, and on loopback authentication is off.
_JSON_MEDIA_TYPE = re.compile(r"application/(?:[\w.+-]+\+)?json", re.IGNORECASE)


class _JobIdConvertor(Convertor):
    """``{job_id:job_id}``: a path segment without ':' (job ids are UUIDs), so /v1/merges/{id}:cancel
    is never also a GET /v1/merges/{job_id} URL and a 405's Allow header names only POST for it."""
    regex = "[^/:]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("job_id", _JobIdConvertor())


def _too_deep() -> ApiError:
    return ApiError(422, "invalid_json", f"request body is nested deeper than {MAX_JSON_DEPTH} levels")


async def _body(request: Request) -> dict[str, Any]:
    """The spec body: JSON (415 otherwise), at most MAX_JSON_DEPTH deep, an object, and at most
    SUBMERGE_MAX_EXPERTS experts (checked before the spec is validated, which would cost per expert)."""
    raw = await request.body()  # whole (bounded by BodySizeLimit), so a refusal leaves the connection usable
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip()
    if not _JSON_MEDIA_TYPE.fullmatch(media_type):
        raise ApiError(415, "unsupported_media_type", f"Content-Type must be application/json, "
                       f"got {media_type or 'none'}", field="Content-Type")
    try:
        data = json.loads(raw or b"null")
    except RecursionError:  # json's parser recurses once per level (about 1000 levels)
        raise _too_deep() from None
    except ValueError as e:
        raise ApiError(422, "invalid_json", f"request body is not valid JSON: {e}") from None
    if json_depth_exceeds(data):
        raise _too_deep()
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_spec", "the request body must be a JSON object (a merge spec)")
    experts, limit = data.get("experts"), request.app.state.settings.max_experts
    if isinstance(experts, list) and len(experts) > limit:
        msg = f"experts: {len(experts)} experts, more than the limit of {limit} (SUBMERGE_MAX_EXPERTS)"
        raise ApiError(422, "invalid_spec", msg, field="experts", details=[{"field": "experts", "message": msg}])
    return data


def _job_output(data: dict[str, Any], output_uri: str) -> tuple[dict[str, Any], dict | None]:
    """The body with output.uri pointed at the service's storage, and the output section as requested."""
    spec_dict = copy.deepcopy(data)
    requested = spec_dict.get("output")
    output = dict(requested) if isinstance(requested, dict) else ({} if requested is None else requested)
    if isinstance(output, dict):
        output["uri"] = output_uri
        output["overwrite"] = True  # a retry replaces what an interrupted attempt left
    spec_dict["output"] = output
    return spec_dict, (copy.deepcopy(requested) if isinstance(requested, dict) else None)


def _admit(spec_dict: dict[str, Any], settings) -> MergeSpec:
    """``workers.policy.admit_spec`` (the worker checks the job again with it), its errors as API errors."""
    try:
        return admit_spec(spec_dict, settings)
    except ValidationError as e:
        raise spec_error(e) from None
    except PolicyError as e:
        raise ApiError(422, e.code, e.message, field=e.field) from None


def _canonical_hash(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


@router.post("/merges", status_code=202, response_model=JobOut, openapi_extra=SPEC_BODY,
             responses={**ERRORS, 409: {"model": ErrorBody, "description": "Idempotency-Key reused with a different body"}},
             summary="Submit a merge job")
async def submit(request: Request, response: Response, tenant: TenantDep, settings: SettingsDep, store: StoreDep,
                 storage: StorageDep, dispatcher: DispatcherDep,
                 idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> JobOut:
    data = await _body(request)
    job_id = str(uuid.uuid4())
    spec_dict, requested = _job_output(data, storage.model_uri(job_id))
    spec = await run_in_threadpool(_admit, spec_dict, settings)  # the policy resolves host names: off the event loop
    try:
        job, created = await run_in_threadpool(
            store.create, tenant=tenant, method=spec.method, spec=spec.model_dump(mode="json", by_alias=True),
            requested_output=redact_obj(requested), max_attempts=settings.max_attempts, idempotency_key=idempotency_key,
            request_hash=_canonical_hash(data), job_id=job_id)
    except IdempotencyConflict as e:
        raise ApiError(409, "idempotency_conflict", f"Idempotency-Key {idempotency_key!r} was used for job {e.job.id} "
                       "with a different request body", field="Idempotency-Key") from None
    # A replay sends a job that is still queued and was never sent (its submit got a 503): the
    # retry the 503 advises. Any other replay changes nothing (send's stamp makes it send once).
    if created or (job.status == "queued" and job.dispatched_at is None):
        try:
            await run_in_threadpool(send, store, dispatcher, job.id)
        except Exception as e:  # noqa: BLE001
            raise ApiError(503, "broker_unavailable", f"job {job.id} was stored but could not be queued "
                           f"({type(e).__name__}: {e}); it stays queued and the reaper sends it once the broker is "
                           "reachable, or resubmit with the same Idempotency-Key to retry now") from None
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/merges/{job.id}"
    return job_out(job)


@router.post("/merges:validate", response_model=ValidationReport, openapi_extra=SPEC_BODY, responses=ERRORS,
             summary="Dry run: validate a spec and read checkpoint headers")
async def validate(request: Request, tenant: TenantDep, settings: SettingsDep, storage: StorageDep) -> ValidationReport:
    data = await _body(request)
    spec_dict, _ = _job_output(data, storage.model_uri("validate"))
    spec = await run_in_threadpool(_admit, spec_dict, settings)
    return await run_in_threadpool(_dry_run, spec, settings, storage)


def _dry_run(spec: MergeSpec, settings, storage: Storage) -> ValidationReport:
    """merging.preflight: checkpoint headers, plan, calibration coverage, the method's own checks."""
    try:
        pf = preflight(spec, io=job_io_config(settings, storage), memory_budget=settings.memory_budget)
    except MergeError as e:
        return ValidationReport(valid=False, error=ErrorInfo(code=e.code, message=redact_text(str(e)), field=e.field))
    plan = pf.plan
    summary = {
        "method": spec.method,
        "params": spec.method_params().model_dump(mode="json", by_alias=True),
        "base": {"uri": redact_uri(spec.base.uri), "format": pf.base.format},
        "experts": [{"name": n, "uri": redact_uri(r.uri), "format": c.format} for n, r, c in zip(spec.expert_names(), spec.experts, pf.experts)],
        "tensors": {"total": len(plan), "merged": sum(p.action == "merge" for p in plan),
                    "copied": sum(p.action == "copy" for p in plan)},
        "roles": dict(Counter(p.role.role.value for p in plan).most_common()),
        "copied": [{"key": p.key, "reason": p.reason} for p in plan if p.action == "copy"][:100],
        "output_bytes": sum(int(torch.Size(p.out_shape).numel()) * p.out_dtype.itemsize for p in plan),
        "memory": pf.memory.report(plan),
        "cost": pf.cost,
    }
    return ValidationReport(valid=True, summary=summary)


def _cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def _parse_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, value = text.partition(":")
        if kind != "seq":
            raise ValueError
        return int(value)
    except ValueError:
        raise ApiError(422, "invalid_request", "cursor: not a cursor returned by this API", field="cursor") from None


@router.get("/merges", response_model=JobList, responses=ERRORS, summary="List jobs, newest first")
def list_jobs(tenant: TenantDep, store: StoreDep,
              status: Annotated[str | None, Query(description="|".join(STATUSES),
                                                  json_schema_extra={"enum": list(STATUSES)})] = None,
              limit: Annotated[int, Query(ge=1, le=200)] = 50,
              cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None) -> JobList:
    if status is not None and status not in STATUSES:
        raise ApiError(422, "invalid_request", f"status: must be one of {', '.join(STATUSES)}", field="status")
    before = _parse_cursor(cursor) if cursor else None
    jobs = store.list(tenant, status=status, limit=limit + 1, before_seq=before)
    more = len(jobs) > limit
    jobs = jobs[:limit]
    return JobList(items=[job_out(j) for j in jobs], next_cursor=_cursor(jobs[-1].seq) if more else None)


def _job(store, job_id: str, tenant: str):
    job = store.get(job_id, tenant)
    if job is None:
        raise not_found()
    return job


@router.get("/merges/{job_id:job_id}", response_model=JobOut, responses=ERRORS, summary="A job's status, progress and result")
def get_job(job_id: str, tenant: TenantDep, store: StoreDep) -> JobOut:
    return job_out(_job(store, job_id, tenant))


@router.post("/merges/{job_id:job_id}:cancel", status_code=202, response_model=JobOut,
             responses={**ERRORS, 409: {"model": ErrorBody, "description": "The job already finished"}}, summary="Cancel a job")
def cancel(job_id: str, tenant: TenantDep, store: StoreDep) -> JobOut:
    job = _job(store, job_id, tenant)
    if job.status in ("succeeded", "failed", "cancelled"):
        raise ApiError(409, "not_cancellable", f"job {job_id} already finished ({job.status})")
    job = store.cancel(job_id, tenant)
    return job_out(job)


@router.get("/merges/{job_id:job_id}/events", response_model=EventList, responses=ERRORS, summary="A job's timeline")
def events(job_id: str, tenant: TenantDep, store: StoreDep) -> EventList:
    _job(store, job_id, tenant)
    return EventList(items=[event_out(e) for e in store.events(job_id)])


def _succeeded(store, job_id: str, tenant: str):
    job = _job(store, job_id, tenant)
    if job.status != "succeeded" or not job.result:
        raise ApiError(409, "not_ready", f"job {job_id} has no result (status {job.status})")
    return job


@router.get("/merges/{job_id:job_id}/report", responses={**ERRORS, 409: {"model": ErrorBody},
            200: {"content": {"application/json": {}, "text/html": {}}}},
            summary="The job's report: report.json, or the self-contained report.html with ?format=html",
            response_class=JSONResponse)
def report(job_id: str, tenant: TenantDep, store: StoreDep, storage: StorageDep,
           format: Literal["json", "html"] = Query("json", description="json (report.json) or html (report.html with plots)")) -> Response:
    _succeeded(store, job_id, tenant)
    name, media = ("report.html", "text/html; charset=utf-8") if format == "html" else ("report.json", "application/json")
    try:
        body = storage.read_bytes(job_id, name)
    except FileNotFoundError:
        raise not_found("report" if format == "json" else "HTML report (diagnostics were off)") from None
    return Response(body, media_type=media)


def _artifact_list(job) -> list[ArtifactOut]:
    return [ArtifactOut(**a, url=f"/v1/merges/{job.id}/artifacts/{a['path']}") for a in job.result.get("artifacts", [])]


@router.get("/merges/{job_id:job_id}/artifacts", response_model=ArtifactList, responses={**ERRORS, 409: {"model": ErrorBody}},
            summary="The merged model's files with sizes and sha256")
def artifacts(job_id: str, tenant: TenantDep, store: StoreDep) -> ArtifactList:
    return ArtifactList(items=_artifact_list(_succeeded(store, job_id, tenant)))


@router.get("/merges/{job_id:job_id}/artifacts/{path:path}", responses={**ERRORS, 409: {"model": ErrorBody},
            200: {"content": {"application/octet-stream": {}}, "description": "The file (Range requests: 206)"},
            307: {"description": "Redirect to a presigned URL (S3 storage)"}}, summary="Download one artifact")
def download(job_id: str, path: str, tenant: TenantDep, store: StoreDep, storage: StorageDep):
    job = _succeeded(store, job_id, tenant)
    art = next((a for a in job.result.get("artifacts", []) if a["path"] == path), None)
    if art is None:  # only recorded artifacts: no path traversal into storage
        raise not_found(f"artifact {path!r}")
    rel = f"model/{path}"
    headers = {"ETag": f'"{art["sha256"]}"', "X-Checksum-SHA256": art["sha256"]}
    if storage.local:
        return FileResponse(storage.local_path(job_id, rel), media_type="application/octet-stream",
                            filename=path.rsplit("/", 1)[-1], headers=headers)
    return RedirectResponse(storage.presign(job_id, rel), status_code=307, headers=headers)

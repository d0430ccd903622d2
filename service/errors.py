"""One error body for every non-2xx answer: ``{"error": {"code", "message", "field"?, "details"?}}``."""
from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

_FIELD_MSG = re.compile(r"^([A-Za-z_][\w]*(?:\.[\w]+)*): (.+)$")
_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
               409: "conflict", 413: "request_too_large", 415: "unsupported_media_type", 422: "invalid_request",
               429: "too_many_requests", 500: "internal_error", 503: "unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None, details: list[dict] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers, self.details = status, code, message, field, headers, details

    def body(self) -> dict:
        err: dict = {"code": self.code, "message": self.message}
        if self.field is not None:
            err["field"] = self.field
        if self.details:
            err["details"] = self.details
        return {"error": err}


def not_found(what: str = "merge job") -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def _strip(msg: str) -> str:
    for p in ("Value error, ", "Assertion failed, "):
        if msg.startswith(p):
            return msg[len(p):]
    return msg


def validation_details(e: ValidationError | RequestValidationError, prefix: tuple = ()) -> list[dict]:
    """Every problem as ``{"field": "params.k", "message": "params.k: ..."}`` (merging.spec style)."""
    out = []
    for err in e.errors():
        loc = tuple(str(x) for x in prefix + tuple(err.get("loc") or ()))
        msg = _strip(str(err.get("msg", "")))
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        if loc:
            field = ".".join(loc)
            out.append({"field": field, "message": f"{field}: {msg}"})
            continue
        # model-level check of MergeSpec: its message already names the field(s), "; "-separated
        for part in msg.split("; "):
            m = _FIELD_MSG.match(part)
            out.append({"field": m.group(1) if m else None, "message": part})
    return out


def spec_error(e: ValidationError) -> ApiError:
    details = validation_details(e)
    first = next((d["field"] for d in details if d["field"]), None)
    return ApiError(422, "invalid_spec", "; ".join(d["message"] for d in details), field=first, details=details)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> str:
    """The ``Allow`` value of a 405: every method some route serves at this path. Starlette names
    only the methods of the first route whose path matched, and one path can have several routes
    (GET and POST /v1/merges). Asking the router per method works however routers are nested."""
    allowed = []
    for method in _METHODS:
        scope = dict(request.scope, method=method)
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError):
        details = []
        for d in validation_details(exc):
            field = d["field"]
            # FastAPI locations start with query/path/header/body: keep the parameter name only
            if field and field.split(".", 1)[0] in ("query", "path", "header", "body", "cookie"):
                field = field.split(".", 1)[1] if "." in field else field
                d = {"field": field, "message": f"{field}: {d['message'].split(': ', 1)[-1]}"}
            details.append(d)
        first = next((d["field"] for d in details if d["field"]), None)
        err = ApiError(422, "invalid_request", "; ".join(d["message"] for d in details) or "invalid request",
                       field=first, details=details)
        return JSONResponse(err.body(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request)
        return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code,
                            headers=headers)

"""/healthz (process up), /readyz (database, broker, storage), /metrics (Prometheus text format)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse

from service.metrics import CONTENT_TYPE, exposition

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness")
def healthz() -> dict:
    return {"status": "ok"}


def _checks(app) -> tuple[bool, dict]:
    checks: dict[str, dict] = {}
    ok = True

    def run(name, fn):
        nonlocal ok
        try:
            fn()
            checks[name] = {"ok": True}
        except Exception as e:  # noqa: BLE001
            ok = False
            checks[name] = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}

    run("database", app.state.store.ping)
    if not app.state.settings.embedded:
        run("broker", app.state.dispatcher.ping)
    run("storage", app.state.storage.check)
    return ok, checks


@router.get("/readyz", summary="Readiness: database, broker (Redis mode) and storage reachable",
            responses={503: {"description": "A dependency is down"}})
async def readyz(request: Request):
    ok, checks = await run_in_threadpool(_checks, request.app)
    return JSONResponse({"status": "ready" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
async def metrics(request: Request):
    text = await run_in_threadpool(exposition, request.app.state.store, request.app.state.dispatcher)
    return PlainTextResponse(text, media_type=CONTENT_TYPE)

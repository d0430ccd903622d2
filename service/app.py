"""The FastAPI application: ``create_app(settings=None)`` (``submerge serve`` runs it under uvicorn).

Startup (lifespan): migrate the job store to the newest alembic revision, start the worker side
(the embedded in-process pool, or a Celery client when SUBMERGE_REDIS_URL is set) and the reaper.
"""
from __future__ import annotations

import gc
import logging
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi

from merging import __version__
from merging.spec import MergeSpec
from service import errors
from service.auth import parse_keys
from service.limits import BodySizeLimit
from service.logs import AccessLog
from service.routers import health, merges, methods
from workers.config import Settings, get_settings
from workers.dispatch import make_dispatcher
from workers.jobs.db import upgrade
from workers.jobs.store import JobStore
from workers.reaper import Reaper
from workers.redact import install_log_redaction, redact_uri, register_secret
from workers.storage import Storage

log = logging.getLogger("submerge.api")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    install_log_redaction()
    register_secret(settings.webhook_secret)
    api_keys = parse_keys(settings.api_keys)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        os.makedirs(settings.data_path, exist_ok=True)
        await run_in_threadpool(upgrade, settings.db_url)
        app.state.dispatcher = make_dispatcher(settings, app.state.store)
        app.state.dispatcher.start()
        app.state.reaper = Reaper(settings, app.state.store, app.state.dispatcher)
        app.state.reaper.start()
        # Everything allocated so far (torch, pydantic schemas, SQLAlchemy, the routes) lives as
        # long as the process. Freezing it keeps the cyclic GC from re-scanning it on every full
        # collection: those scans were the 100-200 ms latency spikes at 200 pollers
        # (bench/RESULTS.md, API latency: p99 121 ms -> 19 ms).
        gc.collect()
        gc.freeze()
        log.info("submerge API ready (%s mode, store %s, storage %s)", "embedded" if settings.embedded else "celery",
                 redact_uri(settings.db_url), settings.storage_root)
        try:
            yield
        finally:
            app.state.reaper.stop()
            await run_in_threadpool(app.state.dispatcher.stop)

    app = FastAPI(title="submerge", version=__version__, lifespan=lifespan,
                  description="Model-merging job service. The job body is merging.spec.MergeSpec.")
    app.state.settings = settings
    app.state.api_keys = api_keys
    app.state.store = JobStore(settings.db_url)
    app.state.storage = Storage(settings)
    errors.install(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    if settings.access_log:  # added last: outermost, so it also logs the 413s of BodySizeLimit
        app.add_middleware(AccessLog)
    app.include_router(merges.router)
    app.include_router(methods.router)
    app.include_router(health.router)
    _add_spec_schema(app)
    return app


def _add_spec_schema(app: FastAPI) -> None:
    """The request body is read raw (so `output` may be omitted) and validated as MergeSpec: put
    MergeSpec's JSON schema into the OpenAPI components that the routes reference."""

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        spec_schema = MergeSpec.model_json_schema(ref_template="#/components/schemas/{model}", by_alias=True)
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, sub in spec_schema.pop("$defs", {}).items():
            comps.setdefault(name, sub)
        # The library has no cap on experts; the service refuses more than SUBMERGE_MAX_EXPERTS (422).
        spec_schema["properties"]["experts"]["maxItems"] = app.state.settings.max_experts
        comps["MergeSpec"] = spec_schema
        app.openapi_schema = schema
        return schema

    app.openapi = openapi

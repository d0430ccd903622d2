"""FastAPI dependencies: settings, job store, storage, dispatcher and the caller's tenant.

All are ``async def``: they do no I/O (a hash comparison at most), and a plain ``def`` dependency
costs a trip through the thread pool on every request (three per poll: measurable under load).
"""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from service.auth import authenticate
from workers.config import Settings
from workers.dispatch import Dispatcher
from workers.jobs.store import JobStore
from workers.storage import Storage


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_store(request: Request) -> JobStore:
    return request.app.state.store


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


async def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


async def get_tenant(request: Request, authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> str:
    server = request.scope.get("server")
    return authenticate(request.app.state.settings, request.app.state.api_keys, authorization, server[0] if server else None)


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
StorageDep = Annotated[Storage, Depends(get_storage)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
TenantDep = Annotated[str, Depends(get_tenant)]

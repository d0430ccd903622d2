"""/v1/methods: every merge method with its JSON parameter schema and defaults."""
from __future__ import annotations

from fastapi import APIRouter

from merging import describe_methods
from service.dependencies import TenantDep
from service.schemas import ErrorBody, MethodList

router = APIRouter(prefix="/v1", tags=["methods"])


@router.get("/methods", response_model=MethodList, responses={401: {"model": ErrorBody}, 422: {"model": ErrorBody}}, summary="Merge methods")
def methods(tenant: TenantDep) -> MethodList:
    return MethodList(items=describe_methods())

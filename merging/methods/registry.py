"""The method registry: method id → method class, filled as ``merging.methods`` imports each
method module (every module registers its class with ``@register``)."""
from __future__ import annotations

from merging.methods.base import MergeMethod

_METHODS: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    if cls.name in _METHODS:
        raise RuntimeError(f"merge method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[MergeMethod]:
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(sorted(_METHODS))}") from None


def method_names() -> list[str]:
    return sorted(_METHODS)


def describe_methods() -> list[dict]:
    """Every method with its summary, JSON parameter schema and defaults (for docs and GET /v1/methods)."""
    out = []
    for name in sorted(_METHODS):
        cls = _METHODS[name]
        defaults = cls.Params().model_dump(mode="json", by_alias=True)
        out.append({"id": name, "summary": cls.summary, "params_schema": cls.Params.model_json_schema(by_alias=True), "defaults": defaults})
    return out

"""Merge-method registry: one class per method id, each with a typed parameter model."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from merging.methods.base import MergeMethod

_METHODS: dict[str, type["MergeMethod"]] = {}


def register(cls: type["MergeMethod"]) -> type["MergeMethod"]:
    if cls.name in _METHODS:
        raise RuntimeError(f"merge method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def _load() -> None:
    import merging.methods  # noqa: F401  (imports every method module, which registers it)


def get_method(name: str) -> type["MergeMethod"]:
    _load()
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(sorted(_METHODS))}") from None


def method_names() -> list[str]:
    _load()
    return sorted(_METHODS)


def describe_methods() -> list[dict]:
    """Every method with its summary, JSON parameter schema and defaults (for docs and GET /v1/methods)."""
    _load()
    out = []
    for name in sorted(_METHODS):
        cls = _METHODS[name]
        defaults = cls.Params().model_dump(mode="json", by_alias=True)
        out.append({"id": name, "summary": cls.summary, "params_schema": cls.Params.model_json_schema(by_alias=True), "defaults": defaults})
    return out

"""The README documents every method with every parameter and its default."""
from __future__ import annotations

import json
from pathlib import Path

import merging

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _fmt(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "off"
    return json.dumps(v) if not isinstance(v, str) else v


def test_every_method_and_default_is_documented():
    for d in merging.describe_methods():
        row = next((ln for ln in README.splitlines() if ln.startswith(f"| `{d['id']}` |")), None)
        assert row is not None, f"README has no row for method {d['id']}"
        for name, default in d["defaults"].items():
            assert f"`{name}`" in row, f"README row of {d['id']} does not name parameter {name}"
            assert f"({_fmt(default)})" in row or (name == "k" and "(20)" in row), f"{d['id']}.{name} default {default} not in README"

"""The docs describe the code as it is: the README documents every method with every parameter
and its default, and docs/ARCHITECTURE.md names only files and functions that exist."""
from __future__ import annotations

import json
import re
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


def test_architecture_names_only_files_and_functions_that_exist():
    """docs/ARCHITECTURE.md describes the code as it is: every `path/file.py` it names exists, and
    every `file.py` `function` pair it names is defined in that file."""
    repo = Path(__file__).resolve().parents[1]
    text = (repo / "docs" / "ARCHITECTURE.md").read_text()
    paths = set(re.findall(r"`((?:service|workers|evaluation|merging)/[\w/]*\.py)`", text))
    assert len(paths) > 20
    for path in paths:
        assert (repo / path).is_file(), f"docs/ARCHITECTURE.md names {path}, which does not exist"
    for path, name in re.findall(r"`((?:service|workers|evaluation|merging)/[\w/]*\.py)` `(\w+)`", text):
        source = (repo / path).read_text()
        assert re.search(rf"^\s*(?:async )?(?:def|class) {name}\b|^{name}\s*[:=]", source, re.M), \
            f"docs/ARCHITECTURE.md names {path} {name}, which is not defined there"

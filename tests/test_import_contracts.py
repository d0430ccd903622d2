"""The import contract of pyproject.toml ([tool.importlinter]): layers point one way, service ->
workers -> evaluation -> merging; merging imports no web, queue or database package; no cycles
between the modules of service, workers or evaluation. ``lint-imports`` (import-linter) checks it,
function-level imports included; ``make test`` runs it before pytest, and this test runs it too.
The contract is shown to bite: a copy of the packages with one upward import, or one cycle,
fails it."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "workers", "evaluation", "merging")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: install the test extra (pip install -e '.[test]')")
    # cwd first on sys.path: the packages are found there (a copy, in the tests below), not in the install
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def copy(tmp_path) -> Path:
    """The four packages (sources only) and pyproject.toml, copied."""
    for name in PACKAGES:
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_contract_is_kept():
    r = _lint(REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_the_copy_is_kept(copy):
    r = _lint(copy)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("importer, line, contract", [
    ("workers/upward.py", "from service.errors import ApiError\n", "never upwards"),
    ("evaluation/upward.py", "import workers.jobs.store\n", "never upwards"),
    # hidden in a function: still an arrow
    ("merging/upward.py", "def f():\n    from evaluation import scoring\n    return scoring\n", "never upwards"),
    ("merging/web.py", "import fastapi\n", "merging is a pure library"),
    ("workers/web.py", "from fastapi import APIRouter\n", "workers import no web framework"),
])
def test_an_upward_import_breaks_the_contract(copy, importer, line, contract):
    (copy / importer).write_text(line)
    r = _lint(copy)
    assert r.returncode != 0, r.stdout
    broken = [ln for ln in r.stdout.splitlines() if ln.endswith("BROKEN")]
    assert any(contract in ln for ln in broken), r.stdout


def test_an_import_cycle_breaks_the_contract(copy):
    # workers.storage -> workers.tasks -> workers.storage
    (copy / "workers" / "storage.py").write_text((copy / "workers" / "storage.py").read_text() + "\nimport workers.tasks\n")
    r = _lint(copy)
    assert r.returncode != 0, r.stdout
    assert any("no import cycles" in ln and ln.endswith("BROKEN") for ln in r.stdout.splitlines()), r.stdout

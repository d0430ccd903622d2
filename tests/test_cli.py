"""The installed ``submerge`` command, run as a subprocess: golden conformance, errors, methods, validate.

Needs the console script (``pip install -e .``, which ``make test`` does first).
"""
from __future__ import annotations

import concurrent.futures
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from safetensors.torch import load_file

from merging import ProgressEvent
from merging.cli import ProgressReporter
from tests.golden import golden_file, load, rel_err, write_task_checkpoints
from tests.test_conformance import MAIN_CASES

MAIN = "golden_main_T3.safetensors"
SUBMERGE = Path(sys.executable).parent / "submerge"


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SUBMERGE_DEBUG"}
    return subprocess.run([str(SUBMERGE), *args], capture_output=True, text=True, timeout=timeout, env=env)


def stderr_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def main_inputs(tmp_path_factory):
    info = golden_file(MAIN)
    tensors = load(MAIN)
    keys = [k["name"] for k in info["keys"]]
    base, experts = write_task_checkpoints(tensors, info["T"], keys, tmp_path_factory.mktemp("cli_golden"))
    return info, tensors, keys, base, experts


def _spec(method, params, base, experts, out) -> dict:
    return {"method": method, "params": params, "base": {"uri": base},
            "experts": [{"uri": e} for e in experts],
            "output": {"uri": str(out), "dtype": "float64"}, "options": {"compute_dtype": "float32", "device": "cpu"}}


def _write_spec(spec: dict, path: Path) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps(spec))
    else:
        path.write_text(yaml.safe_dump(spec))
    return path


def _check_golden(case: str, out_dir: Path, info, tensors, keys) -> None:
    rtol = next(c for c in info["cases"] if c["case"] == case)["suggested_rtol_float32"]
    out = load_file(str(out_dir / "model.safetensors"))
    assert sorted(out) == sorted(keys)
    for key in keys:
        err = rel_err(out[key], tensors[f"{case}.{key}"])
        assert err <= rtol, f"{case} {key}: rel err {err:.3g} > {rtol:.3g}"


@pytest.fixture(scope="module")
def cli(main_inputs, tmp_path_factory):
    """Every subprocess run of this module, started together: interpreter + torch start-up dominates."""
    if not SUBMERGE.exists():
        pytest.fail(f"{SUBMERGE} is missing: install the project first (`make install` or `pip install -e .`)")
    info, tensors, keys, base, experts = main_inputs
    d = tmp_path_factory.mktemp("cli_runs")
    missing = str(d / "nowhere" / "base.safetensors")
    validate = _spec("tsv_m", {"alpha": 1.0}, base, experts, d / "validate_out")
    validate["passthrough"] = ["*.bias"]
    runs = {
        # (a) golden cases; spec as JSON, as YAML (.yaml with overrides), as YAML (.yml with --json)
        "tsvm": ["merge", _write_spec(_spec("tsv_m", {"alpha": 1.0}, base, experts, d / "tsvm_out"), d / "tsvm.json")],
        "iso_cts": ["merge", _write_spec(_spec("iso_cts", {"alpha": 1.0, "common_space_fraction": 0.8}, base, experts,
                                               d / "not_used"), d / "iso_cts.yaml"),
                    "--output", d / "iso_cts_out", "--quiet", "--device", "cpu"],
        "ties": ["merge", _write_spec(_spec("ties", {"alpha": 1.0, "k": 20, "merge_func": "mean"}, base, experts,
                                            d / "ties_out"), d / "ties.yml"), "--json"],
        # (b) failures
        "unknown_method": ["merge", _write_spec(_spec("frobnicate_merge", {}, base, experts, d / "unknown_out"), d / "bad.json")],
        "missing_base": ["merge", _write_spec(_spec("tsv_m", {}, missing, experts, d / "missing_out"), d / "missing.yaml")],
        # (c), (d)
        "methods": ["methods", "--json"],
        "validate": ["validate", _write_spec(validate, d / "validate.yaml")],
    }
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 2)) as pool:
        futures = {name: pool.submit(run_cli, *map(str, args)) for name, args in runs.items()}
    return SimpleNamespace(dir=d, missing=missing, keys=keys, info=info, tensors=tensors,
                           results={name: f.result() for name, f in futures.items()})


# ---------------------------------------------------------------------------------------
# (a) conformance through the CLI, (e) summary


def test_tsvm_json_spec_text_summary(cli):
    proc, out, keys = cli.results["tsvm"], cli.dir / "tsvm_out", cli.keys
    assert proc.returncode == 0, proc.stderr
    _check_golden("tsvm", out, cli.info, cli.tensors, keys)
    # summary on stdout names the output, method, tensor counts and files
    assert str(out) in proc.stdout
    assert "tsv_m" in proc.stdout
    assert f"{len(keys)} total: {len(keys)} merged, 0 copied" in proc.stdout
    assert "model.safetensors" in proc.stdout and "merge.json" in proc.stdout
    # progress on stderr (not a TTY here): a few lines, no carriage returns, no flood
    lines = stderr_lines(proc)
    assert "\r" not in proc.stderr
    assert any(" merge " in line for line in lines)
    assert 1 <= len(lines) <= 30, proc.stderr
    assert not any("error" in line for line in lines)


def test_iso_cts_yaml_spec_with_overrides(cli):
    proc, out = cli.results["iso_cts"], cli.dir / "iso_cts_out"
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""  # --quiet
    assert not (cli.dir / "not_used").exists()  # --output replaced output.uri
    _check_golden("iso_cts", out, cli.info, cli.tensors, cli.keys)
    assert str(out) in proc.stdout


def test_ties_yml_spec_json_summary(cli):
    proc, out, keys = cli.results["ties"], cli.dir / "ties_out", cli.keys
    assert proc.returncode == 0, proc.stderr
    _check_golden("ties_k20_mean", out, cli.info, cli.tensors, keys)
    summary = json.loads(proc.stdout)
    assert summary["output_uri"] == str(out)
    assert summary["method"] == "ties"
    assert summary["params"]["k"] == 20
    assert summary["tensors"] == {"total": len(keys), "merged": len(keys), "copied": 0}
    assert summary["files"]["model.safetensors"]["size"] == (out / "model.safetensors").stat().st_size
    assert summary["timings_s"]["total"] >= 0 and summary["wall_s"] >= 0
    manifest = json.loads((out / "merge.json").read_text())
    assert manifest["coverage"] == summary["tensors"]


# ---------------------------------------------------------------------------------------
# (b) failures: one stderr line, exit status by kind


def test_unknown_method_exits_2_with_one_line(cli):
    proc = cli.results["unknown_method"]
    assert proc.returncode == 2
    lines = stderr_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("submerge: error: invalid_spec: ")
    assert "frobnicate_merge" in lines[0]
    assert proc.stdout == ""
    assert not (cli.dir / "unknown_out").exists()


def test_missing_base_exits_1_naming_the_uri(cli):
    proc = cli.results["missing_base"]
    assert proc.returncode == 1
    lines = stderr_lines(proc)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("submerge: error: unreadable_uri: ")
    assert cli.missing in lines[0]
    assert proc.stdout == ""
    assert not (cli.dir / "missing_out").exists()
    assert not [p for p in cli.dir.iterdir() if p.name.startswith(".missing_out.partial")]  # staging removed


# ---------------------------------------------------------------------------------------
# (c) methods, (d) validate


def test_methods_json_lists_every_method_with_defaults(cli):
    import merging

    proc = cli.results["methods"]
    assert proc.returncode == 0, proc.stderr
    methods = {m["id"]: m for m in json.loads(proc.stdout)}
    assert sorted(methods) == merging.method_names()
    for m in methods.values():
        assert m["summary"]
        assert "alpha" in m["defaults"]
        assert all({"name", "type", "description"} <= set(p) for p in m["params"])
    assert methods["ties"]["defaults"]["k"] == 20
    assert methods["ties"]["defaults"]["merge_func"] == "mean"
    assert methods["iso_cts"]["defaults"]["common_space_fraction"] == 0.8
    assert methods["consensus"]["defaults"]["lambda"] == 0.6  # the name a spec uses (alias)


def test_validate_prints_plan(cli):
    proc, keys = cli.results["validate"], cli.keys
    assert proc.returncode == 0, proc.stderr
    assert f"{len(keys)} tensors: {len(keys) - 1} merged, 1 copied" in proc.stdout
    assert "roles" in proc.stdout and "matrix" in proc.stdout
    assert "blk.fc_a.bias" in proc.stdout
    assert not (cli.dir / "validate_out").exists()


# ---------------------------------------------------------------------------------------
# every golden case, both precisions, through the CLI code path (in-process: spec file -> main())


@pytest.mark.parametrize("compute", ["float64", "float32"])
@pytest.mark.parametrize("case", sorted(MAIN_CASES))
def test_all_golden_cases_via_cli_main(main_inputs, tmp_path, capsys, case, compute):
    info, tensors, keys, base, experts = main_inputs
    method, params = MAIN_CASES[case]
    spec = _spec(method, params, base, experts, tmp_path / "unused")
    spec["options"]["compute_dtype"] = compute
    path = _write_spec(spec, tmp_path / ("spec.json" if compute == "float64" else "spec.yaml"))
    out = tmp_path / "out"
    status, stdout, err = _main(capsys, "merge", str(path), "--output", str(out), "--quiet", "--json")
    assert status == 0, err
    assert json.loads(stdout)["output_uri"] == str(out)
    rtol = next(c for c in info["cases"] if c["case"] == case)[f"suggested_rtol_{compute}"]
    merged = load_file(str(out / "model.safetensors"))
    for key in keys:
        ref = (sum(tensors[f"tv.{t}.{key}"].double() for t in range(info["T"])) if case == "ta_sum"
               else tensors[f"{case}.{key}"])
        err_ = rel_err(merged[key], ref)
        assert err_ <= rtol, f"{case} {key}: rel err {err_:.3g} > {rtol:.3g}"


# ---------------------------------------------------------------------------------------
# more of the same contract, in-process (no interpreter start per case)


def _main(capsys, *argv: str) -> tuple[int, str, list[str]]:
    from service.cli import main

    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def test_in_process_validate_json_overwrite_and_errors(main_inputs, tmp_path, capsys):
    _, _, keys, base, experts = main_inputs
    out = tmp_path / "out"
    path = _write_spec(_spec("ties", {"k": 20}, base, experts, out), tmp_path / "spec.json")

    status, stdout, err = _main(capsys, "validate", str(path), "--json")
    assert status == 0, err
    plan = json.loads(stdout)
    assert plan["tensors"] == {"total": len(keys), "merged": len(keys), "copied": 0}
    assert sum(plan["roles"].values()) == len(keys) and plan["warnings"] == []

    out.mkdir()
    (out / "stale.txt").write_text("x")
    status, stdout, err = _main(capsys, "validate", str(path))
    assert status == 0 and "--overwrite" in stdout  # warned, not failed
    status, stdout, err = _main(capsys, "merge", str(path), "--quiet")
    assert status == 1 and len(err) == 1 and err[0].startswith("submerge: error: output_error: ") and str(out) in err[0]
    assert (out / "stale.txt").exists() and stdout == ""
    status, stdout, err = _main(capsys, "merge", str(path), "--overwrite", "--quiet", "--json")
    assert status == 0, err
    assert json.loads(stdout)["output_uri"] == str(out)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()

    status, stdout, err = _main(capsys, "merge", str(tmp_path / "absent.yaml"))
    assert status == 2 and len(err) == 1 and "absent.yaml" in err[0] and stdout == ""

    bad = _write_spec(_spec("ties", {"k": 20}, str(tmp_path / "nope.safetensors"), experts, out), tmp_path / "bad.yaml")
    status, stdout, err = _main(capsys, "validate", str(bad))
    assert status == 1 and len(err) == 1 and str(tmp_path / "nope.safetensors") in err[0]

    bad = _write_spec(_spec("ties", {"k": 500}, base, experts, out), tmp_path / "range.yaml")
    status, stdout, err = _main(capsys, "merge", str(bad))
    assert status == 2 and len(err) == 1 and "params.k" in err[0]

    for argv in (["merge", "--device", "tpu"], ["serve", "--port", "notaport"], ["frobnicate"], []):
        status, stdout, err = _main(capsys, *argv)
        assert status == 2 and len(err) == 1 and err[0].startswith("submerge: error: usage: "), (argv, err)


# ---------------------------------------------------------------------------------------
# the progress reporter itself (in-process, fake clock)


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _drive(reporter: ProgressReporter, clock: _Clock, n: int = 1000) -> None:
    reporter(ProgressEvent("inspect", 0, 1, message="reading checkpoint headers"))
    reporter(ProgressEvent("inspect", 1, 1))
    for i in range(n):
        clock.t += 0.01
        reporter(ProgressEvent("merge", i, n, f"layer.{i}.weight"))
    reporter(ProgressEvent("finalize", 0, 1, message="hashing"))
    reporter(ProgressEvent("publish", 0, 1))
    reporter(ProgressEvent("done", 1, 1))
    reporter.close()


def test_progress_log_mode_is_sparse():
    stream, clock = io.StringIO(), _Clock()
    _drive(ProgressReporter(stream, tty=False, clock=clock), clock)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    merge_lines = [line for line in lines if " merge " in line]
    assert 10 <= len(merge_lines) <= 11  # phase start + every 10 %
    assert len(lines) <= 16
    assert any("eta" in line and "layer." in line for line in merge_lines)


def test_progress_inspect_failure_prints_nothing():
    stream = io.StringIO()
    reporter = ProgressReporter(stream, tty=False)
    reporter(ProgressEvent("inspect", 0, 1, message="reading checkpoint headers"))
    reporter.close()
    assert stream.getvalue() == ""


def test_progress_tty_mode_is_one_line():
    stream, clock = io.StringIO(), _Clock()
    _drive(ProgressReporter(stream, tty=True, clock=clock, width=80), clock)
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, ended once at the end
    frames = [f for f in text.split("\r") if f]
    assert 20 <= len(frames) <= 200  # throttled, not once per tensor
    assert all(len(f.replace("\x1b[K", "").rstrip("\n")) <= 79 for f in frames)
    assert any("merge" in f and "%" in f and "eta" in f for f in frames)

    # after a failure the line is erased, so the error line stands alone
    stream = io.StringIO()
    reporter = ProgressReporter(stream, tty=True, clock=_Clock(), width=80)
    reporter(ProgressEvent("merge", 3, 10, "k"))
    reporter.close()
    text = stream.getvalue()  # tqdm blanks the last frame out with spaces, then returns the cursor
    assert text.endswith("\r" + " " * len(text.split("\r")[-3]) + "\r") and "\n" not in text


def test_interrupt_and_unexpected_errors(main_inputs, tmp_path, capsys, monkeypatch):
    import merging.engine

    _, _, _, base, experts = main_inputs
    path = _write_spec(_spec("tsv_m", {}, base, experts, tmp_path / "out"), tmp_path / "spec.json")

    def interrupted(spec, progress=None, **kw):
        progress(ProgressEvent("merge", 1, 5, "blk.fc_a.weight"))
        raise KeyboardInterrupt

    monkeypatch.setattr(merging.engine, "merge", interrupted)
    status, stdout, err = _main(capsys, "merge", str(path))
    assert status == 130 and err[-1] == "submerge: error: interrupted: interrupted by user; nothing was published"
    assert len(err) == 2 and " merge 1/5 " in err[0]  # the progress line logged before ^C, then the error

    def broken(spec, progress=None, **kw):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(merging.engine, "merge", broken)
    monkeypatch.delenv("SUBMERGE_DEBUG", raising=False)
    status, stdout, err = _main(capsys, "merge", str(path))
    assert status == 1 and err == ["submerge: error: internal_error: RuntimeError: boom second line"]
    monkeypatch.setenv("SUBMERGE_DEBUG", "1")
    status, stdout, err = _main(capsys, "merge", str(path))
    assert status == 1 and err[0].startswith("Traceback") and err[-1] == "submerge: error: internal_error: RuntimeError: boom second line"

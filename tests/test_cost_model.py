"""Preflight's wall-time estimate (merging/cost.py): its work units follow from the plan, it is
reported by ``validate`` with its parts and the model it came from, and it says why when there is
no fitted model for the device or the method."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from merging.cost import CostModel, estimate_wall
from merging.io.sources import IOConfig
from merging.plan import preflight, prepare

T = 3
SHAPES = {"model.embed_tokens.weight": (512, 64), "model.layers.0.self_attn.q_proj.weight": (64, 64),
          "model.layers.0.mlp.down_proj.weight": (64, 128), "model.norm.weight": (64,)}
MODEL = CostModel(device="cpu", measured="a test model", startup_s=0.5, read_bytes_per_s=1e6, write_bytes_per_s=2e6,
                  elementwise_s={"task_arithmetic": 1e-6, "tsv_m": 1e-6}, matrix_s={"tsv_m": 1e-9})


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cost")
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    save_file(base, str(root / "base.safetensors"))
    for t in range(T):
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(root / f"e{t}.safetensors"))
    return root


def _spec(root, method, **options):
    return {"method": method, "base": {"uri": str(root / "base.safetensors")},
            "experts": [{"uri": str(root / f"e{t}.safetensors")} for t in range(T)],
            "output": {"uri": str(root / f"out-{method}")}, "options": {"diagnostics": "off", "workers": 2, **options}}


def _estimate(root, method, model=MODEL, device="cpu"):
    prepared = prepare(preflight(_spec(root, method)).spec, IOConfig())
    prepared.close()
    return estimate_wall(prepared.plan, prepared.method, T, prepared.memory, torch.device(device), model)


def test_the_estimate_is_the_model_applied_to_the_plan(ckpts):
    entries = sum(torch.Size(s).numel() for s in SHAPES.values())
    # Task Arithmetic: every input read once ((T + 1) x 4 B an entry), T x entries element-wise, the output written
    est = _estimate(ckpts, "task_arithmetic")
    read, compute, write = (T + 1) * entries * 4 / 1e6, T * entries * 1e-6 / 2, entries * 4 / 2e6
    assert est["estimated_wall_s"] == pytest.approx(round(0.5 + max(read, compute) + write, 1))
    assert est["parts_s"] == {"read": round(read, 1), "compute": round(compute, 1), "write": round(write, 1), "startup": 0.5}
    assert est["model"] == {"device": "cpu", "measured": "a test model"}
    # TSV-M: its two matrices cost T x m x n x min(m, n) each; the table and the norm are means
    est = _estimate(ckpts, "tsv_m")
    matrix = T * (64 * 64 * 64 + 64 * 128 * 64) * 1e-9
    mean = T * (512 * 64 + 64) * 1e-6
    assert est["parts_s"]["compute"] == round((matrix + mean) / 2, 1)


def test_no_estimate_without_a_fitted_model_and_the_reason(ckpts):
    assert _estimate(ckpts, "task_arithmetic", device="cuda") == {
        "estimated_wall_s": None, "reason": "no cost model fitted for device 'cuda'"}
    assert _estimate(ckpts, "ties") == {"estimated_wall_s": None, "reason": "no cost model fitted for 'ties'"}


def test_validate_reports_the_shipped_models_estimate(ckpts):
    """The model in merging/cost_model.json covers the CPU methods; ``submerge validate`` prints it."""
    shipped = CostModel.load()
    assert shipped is not None and shipped.device == "cpu"
    for key in ("weight_average", "task_arithmetic", "ties", "dare", "consensus", "breadcrumbs", "tsv_m", "iso_c", "iso_cts"):
        assert shipped.elementwise_s[key] > 0, key
    pf = preflight(_spec(ckpts, "ties"))
    assert pf.cost["estimated_wall_s"] > 0 and pf.cost["model"]["measured"] == shipped.measured
    spec_file = ckpts / "spec.json"
    spec_file.write_text(json.dumps(_spec(ckpts, "ties")))
    r = subprocess.run([sys.executable, "-m", "merging.cli", "validate", str(spec_file)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "s estimated (read " in r.stdout and shipped.measured in r.stdout

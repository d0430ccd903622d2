"""Conformance with the official implementations (../shared/golden), through the public merge() API."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import merging
from tests.golden import golden_file, load, rel_err, write_task_checkpoints

MAIN = "golden_main_T3.safetensors"

# golden case -> (method, params). α = 1 so θ_merged − θ0 is the merged task vector.
MAIN_CASES = {
    "tsvm": ("tsv_m", {"alpha": 1.0}),
    "iso_c": ("iso_c", {"alpha": 1.0}),
    "iso_cts": ("iso_cts", {"alpha": 1.0, "common_space_fraction": 0.8}),
    "sb_ta_beta0.01": ("task_arithmetic", {"alpha": 1.0, "subspace_boosting": {"beta": 0.01}}),
    "sb_ta_beta0.5": ("task_arithmetic", {"alpha": 1.0, "subspace_boosting": {"beta": 0.5}}),
    "ties_k20_mean": ("ties", {"alpha": 1.0, "k": 20, "merge_func": "mean"}),
    "ties_k20_sum": ("ties", {"alpha": 1.0, "k": 20, "merge_func": "sum"}),
    "consensus_l0.4_k2": ("consensus", {"alpha": 1.0, "lambda": 0.4, "k": 2}),
    "ta_sum": ("task_arithmetic", {"alpha": 1.0}),
}


@pytest.fixture(scope="module")
def main_inputs(tmp_path_factory):
    info = golden_file(MAIN)
    tensors = load(MAIN)
    keys = [k["name"] for k in info["keys"]]
    base, experts = write_task_checkpoints(tensors, info["T"], keys, tmp_path_factory.mktemp("golden_main"))
    return info, tensors, keys, base, experts


def _spec(method, params, base, experts, out, compute="float64"):
    return {"method": method, "params": params, "base": {"uri": base},
            "experts": [{"uri": e} for e in experts],
            "output": {"uri": str(out), "dtype": "float64"}, "options": {"compute_dtype": compute}}


@pytest.mark.parametrize("compute", ["float64", "float32"])
@pytest.mark.parametrize("case", sorted(MAIN_CASES))
def test_main_cases(main_inputs, tmp_path, case, compute):
    info, tensors, keys, base, experts = main_inputs
    method, params = MAIN_CASES[case]
    case_info = next(c for c in info["cases"] if c["case"] == case)
    rtol = case_info["suggested_rtol_float64"] if compute == "float64" else case_info["suggested_rtol_float32"]
    merging.merge(_spec(method, params, base, experts, tmp_path / "out", compute))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for key in keys:
        if case == "ta_sum":
            ref = sum(tensors[f"tv.{t}.{key}"].double() for t in range(info["T"]))
        else:
            ref = tensors[f"{case}.{key}"]
        err = rel_err(out[key], ref)
        assert err <= rtol, f"{case} {key}: rel err {err:.3g} > {rtol:.3g}"


ESM = "golden_esm_T4.safetensors"


@pytest.fixture(scope="module")
def esm_inputs(tmp_path_factory):
    from safetensors.torch import save_file
    info = golden_file(ESM)
    tensors = load(ESM)
    keys = info["generation"]["keys_in_order"]
    root = tmp_path_factory.mktemp("golden_esm")
    base, experts = write_task_checkpoints(tensors, info["T"], keys, root)
    raw, gram = [], []
    for t in range(info["T"]):
        x = {k: tensors[f"X.{t}.{k}"].contiguous() for k in info["esd_keys"]}
        save_file(x, str(root / f"calib_raw{t}.safetensors"))
        g = {}
        for k, v in x.items():
            v64 = v.double()
            g[f"{k}:gram"] = v64.mT @ v64
            g[f"{k}:count"] = torch.tensor(v.shape[0], dtype=torch.int64)
        save_file(g, str(root / f"calib_gram{t}.safetensors"))
        raw.append(str(root / f"calib_raw{t}.safetensors"))
        gram.append(str(root / f"calib_gram{t}.safetensors"))
    return info, tensors, keys, base, experts, raw, gram


@pytest.mark.parametrize("stats", ["raw", "gram"])
@pytest.mark.parametrize("compute", ["float64", "float32"])
def test_esm(esm_inputs, tmp_path, stats, compute):
    info, tensors, keys, base, experts, raw, gram = esm_inputs
    calib = raw if stats == "raw" else gram
    spec = _spec("esm", {"alpha": 1.0}, base, experts, tmp_path / "out", compute)
    for e, c in zip(spec["experts"], calib):
        e["calibration"] = {"uri": c}
    merging.merge(spec)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    case = info["cases"][0]
    rtol = case["suggested_rtol_float64"] if compute == "float64" else case["suggested_rtol_float32"]
    for key in keys:
        err = rel_err(out[key], tensors[f"esm.{key}"])
        assert err <= rtol, f"esm {key}: rel err {err:.3g} > {rtol:.3g}"

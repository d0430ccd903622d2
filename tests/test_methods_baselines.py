"""Baselines whose definitions are simple enough to restate directly: weight averaging, DARE,
Breadcrumbs, Consensus with per-expert λ; ESM's calibration errors; parameter validation."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import merging
from merging.errors import CalibrationError, SpecError
from merging.methods.dare import key_seed

KEYS = {"layer.weight": (12, 10), "layer.bias": (12,)}


@pytest.fixture()
def inputs(tmp_path):
    torch.manual_seed(0)
    base = {k: torch.randn(s) for k, s in KEYS.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    experts = []
    for t in range(3):
        e = {k: v + 0.1 * torch.randn_like(v) for k, v in base.items()}
        save_file(e, str(tmp_path / f"e{t}.safetensors"))
        experts.append(e)
    return tmp_path, base, experts


def _merge(root, method, params, out="out", **extra):
    spec = {"method": method, "params": params, "base": {"uri": str(root / "base.safetensors")},
            "experts": [{"uri": str(root / f"e{t}.safetensors")} for t in range(3)],
            "output": {"uri": str(root / out)}, **extra}
    merging.merge(spec)
    return load_file(str(root / out / "model.safetensors"))


def test_weight_average_is_mean_of_weights(inputs):
    root, base, experts = inputs
    out = _merge(root, "weight_average", {})
    for k in KEYS:
        assert torch.allclose(out[k], torch.stack([e[k] for e in experts]).mean(0), atol=1e-6)


def test_dare_matches_definition_and_is_seeded(inputs):
    root, base, experts = inputs
    p, alpha = 0.4, 0.5
    out = _merge(root, "dare", {"p": p, "alpha": alpha, "seed": 7})
    again = _merge(root, "dare", {"p": p, "alpha": alpha, "seed": 7}, out="out2")
    other = _merge(root, "dare", {"p": p, "alpha": alpha, "seed": 8}, out="out3")
    for k, shape in KEYS.items():
        total = torch.zeros(shape)
        for t, e in enumerate(experts):
            g = torch.Generator().manual_seed(key_seed(7, k, t))
            keep = torch.rand(shape, generator=g) >= p
            total += (e[k] - base[k]) * keep / (1 - p)
        assert torch.allclose(out[k], base[k] + alpha * total, atol=1e-6)
        assert torch.equal(out[k], again[k])
        assert not torch.equal(out[k], other[k])


def test_breadcrumbs_keeps_the_middle_band(inputs):
    root, base, experts = inputs
    density, gamma = 0.6, 0.1
    out = _merge(root, "breadcrumbs", {"density": density, "gamma": gamma, "alpha": 1.0})
    for k in KEYS:
        total = torch.zeros_like(base[k])
        for e in experts:
            tau = (e[k] - base[k]).reshape(-1)
            n = tau.numel()
            n_top, n_bottom = int(gamma * n), n - int(density * n) - int(gamma * n)
            order = torch.argsort(tau.abs(), stable=True)
            keep = torch.zeros(n, dtype=torch.bool)
            keep[order[n_bottom:n - n_top]] = True
            assert keep.sum() == int(density * n)
            total += (tau * keep).reshape(base[k].shape)
        assert torch.allclose(out[k], base[k] + total, atol=1e-6)


def test_consensus_per_expert_lambda(inputs):
    root, base, experts = inputs
    lam = [0.2, 0.5, 0.9]
    out = _merge(root, "consensus", {"lambda": lam, "k": 2, "alpha": 1.0})
    for k in KEYS:
        taus = [e[k] - base[k] for e in experts]
        total = sum(taus)
        count = sum((t.abs() > lam_t * (total - t).abs()).int() for t, lam_t in zip(taus, lam))
        assert torch.allclose(out[k], base[k] + total * (count >= 2), atol=1e-6)


@pytest.mark.parametrize("params,field", [
    ({"lambda": [0.2, 0.3]}, "params.lambda"),
    ({"k": 5}, "params.k"),
    ({"lambda": 0.5, "bogus": 1}, "params.bogus"),
])
def test_consensus_parameter_errors_name_the_field(inputs, params, field):
    root, _, _ = inputs
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        _merge(root, "consensus", params)
    assert not (root / "out").exists()


@pytest.mark.parametrize("method,params,field", [
    ("ties", {"k": 150}, "params.k"), ("ties", {"merge_func": "median"}, "params.merge_func"),
    ("dare", {"p": 1.0}, "params.p"), ("breadcrumbs", {"density": 0.1, "gamma": 0.2}, "params"),
    ("iso_cts", {"common_space_fraction": 1.5}, "params.common_space_fraction"),
    ("task_arithmetic", {"alpha": "nan"}, "params.alpha"),
    ("task_arithmetic", {"subspace_boosting": {"beta": 2}}, "params.subspace_boosting.beta"),
    ("tsv_m", {"subspace_boosting": {"beta": 0.01}}, "params.subspace_boosting"),
])
def test_parameter_validation(inputs, method, params, field):
    root, _, _ = inputs
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        _merge(root, method, params)


def test_every_method_takes_alpha():
    for d in merging.describe_methods():
        assert "alpha" in d["defaults"], d["id"]


def _esm_inputs(root):
    torch.manual_seed(0)
    keys = {"blocks.0.attn.in_proj_weight": (12, 4), "blocks.0.mlp.c_fc.weight": (16, 4), "blocks.0.mlp.c_proj.weight": (4, 16)}
    save_file({k: torch.zeros(s) for k, s in keys.items()}, str(root / "base.safetensors"))
    for t in range(3):
        save_file({k: torch.randn(s) * 0.01 for k, s in keys.items()}, str(root / f"e{t}.safetensors"))
    return keys


def test_esm_without_calibration_is_a_clear_error(tmp_path):
    _esm_inputs(tmp_path)
    with pytest.raises(CalibrationError, match=r"expert 'expert0' has no calibration"):
        _merge(tmp_path, "esm", {})
    assert not (tmp_path / "out").exists()


def test_esm_missing_layer_in_calibration_names_layer_and_expert(tmp_path):
    keys = _esm_inputs(tmp_path)
    calib = []
    for t in range(3):
        x = {k: torch.randn(40, s[1]) for k, s in keys.items() if t != 1 or "c_fc" not in k}
        save_file(x, str(tmp_path / f"c{t}.safetensors"))
        calib.append({"uri": str(tmp_path / f"c{t}.safetensors")})
    spec = {"method": "esm", "base": {"uri": str(tmp_path / "base.safetensors")},
            "experts": [{"uri": str(tmp_path / f"e{t}.safetensors"), "calibration": calib[t]} for t in range(3)],
            "output": {"uri": str(tmp_path / "out")}}
    with pytest.raises(CalibrationError, match=r"expert 'expert1'.*'blocks\.0\.mlp\.c_fc\.weight'"):
        merging.merge(spec)
    assert not (tmp_path / "out").exists()
    # wrong input width is named too
    save_file({k: torch.randn(40, s[1] + 1) for k, s in keys.items()}, str(tmp_path / "c1.safetensors"))
    with pytest.raises(CalibrationError, match=r"expert 'expert1'.*expected \[tokens, 4\]"):
        merging.merge(spec)
    assert not (tmp_path / "out").exists()

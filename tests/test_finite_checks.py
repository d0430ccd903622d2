"""NaN/Inf checks: one reduction each (the exact mask only when the sum is not finite), still exact."""
import os

import pytest
import torch
from safetensors.torch import save_file

import merging
from merging.errors import CalibrationError, MergeError
from merging.linalg import all_finite

BIG = torch.finfo(torch.float32).max


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_is_exact(dtype):
    top = torch.finfo(dtype).max
    assert all_finite(torch.full((1000,), top, dtype=dtype))  # its own-dtype sum would overflow
    assert all_finite(torch.empty(0, dtype=dtype))
    for bad in (float("inf"), float("-inf"), float("nan")):
        t = torch.zeros(1000, dtype=dtype)
        t[417] = bad
        assert not all_finite(t)
    t = torch.zeros(10, dtype=dtype)
    t[1], t[2] = float("inf"), float("-inf")  # cancel to NaN, not to a finite number
    assert not all_finite(t)


def test_a_merge_that_overflows_fails_and_publishes_nothing(tmp_path):
    save_file({"fc.weight": torch.zeros(4, 3)}, str(tmp_path / "b.safetensors"))
    for t in range(2):  # finite inputs whose task-vector sum overflows float32
        save_file({"fc.weight": torch.full((4, 3), BIG)}, str(tmp_path / f"e{t}.safetensors"))
    with pytest.raises(MergeError) as err:
        merging.merge({"method": "task_arithmetic", "base": {"uri": str(tmp_path / "b.safetensors")},
                       "experts": [{"uri": str(tmp_path / f"e{t}.safetensors")} for t in range(2)],
                       "output": {"uri": str(tmp_path / "out")}})
    assert err.value.code == "numerical_failure" and "'fc.weight'" in str(err.value)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("form", ["gram", "inputs"])
def test_non_finite_calibration_is_named(tmp_path, form):
    key = "blocks.0.mlp.c_fc.weight"
    save_file({key: torch.zeros(16, 4)}, str(tmp_path / "b.safetensors"))
    experts = []
    torch.manual_seed(0)
    for t in range(2):
        save_file({key: torch.randn(16, 4)}, str(tmp_path / f"e{t}.safetensors"))
        x = torch.randn(30, 4)
        if t == 1:
            x[3, 2] = float("inf")
        stats = {key: x} if form == "inputs" else {f"{key}:gram": x.mT @ x, f"{key}:count": torch.tensor([30])}
        save_file(stats, str(tmp_path / f"c{t}.safetensors"))
        experts.append({"uri": str(tmp_path / f"e{t}.safetensors"), "name": f"x{t}",
                        "calibration": {"uri": str(tmp_path / f"c{t}.safetensors")}})
    with pytest.raises(CalibrationError, match=rf"expert 'x1' calibration: '{key}' holds NaN/Inf"):
        merging.merge({"method": "esm", "base": {"uri": str(tmp_path / "b.safetensors")}, "experts": experts,
                       "output": {"uri": str(tmp_path / "out")}})
    assert not os.path.exists(tmp_path / "out")

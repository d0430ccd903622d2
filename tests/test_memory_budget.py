"""The memory budget holds in a real process: peak RSS of a merge measured in a subprocess, on
inputs whose unblocked merge takes several times the budget; and preflight's estimate of the peak
is within 25 % of what the process reaches."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

T = 4
MiB = 1 << 20

# Runs in a fresh interpreter: the peak RSS before the merge (imports, preflight) and after it.
# VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's peak (here, pytest's).
SCRIPT = r"""
import json, sys
import merging
from merging.plan import preflight

def peak_rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

spec = json.loads(sys.argv[1])
pf = preflight(spec)
before = peak_rss()
merging.merge(spec)
after = peak_rss()
print(json.dumps({"before": before, "after": after, "estimate": pf.memory.estimated_peak,
                  "row_blocked": len(pf.memory.blocks)}))
"""


def _write(root, name, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]):
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(shape, generator=g).to(dtype) for k, (shape, dtype) in tensors.items()}
    (root / name).mkdir()
    save_file(base, str(root / name / "base.safetensors"))
    for t in range(T):
        save_file({k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()},
                  str(root / name / f"e{t}.safetensors"))
    return root / name


@pytest.fixture(scope="module")
def llm_like(tmp_path_factory):
    """A bf16 vocabulary table (32768 x 512: 32 MiB per checkpoint), plus a norm and a square matrix."""
    return _write(tmp_path_factory.mktemp("mem"), "bf16", {
        "model.embed_tokens.weight": ((32768, 512), torch.bfloat16),
        "model.norm.weight": ((512,), torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": ((512, 512), torch.bfloat16)})


@pytest.fixture(scope="module")
def wide_head(tmp_path_factory):
    """An fp32 LM head of 16384 x 1024 (64 MiB per checkpoint)."""
    return _write(tmp_path_factory.mktemp("mem"), "fp32", {"lm_head.weight": ((16384, 1024), torch.float32)})


def _measure(root, method, budget):
    spec = {"method": method, "base": {"uri": str(root / "base.safetensors")},
            "experts": [{"uri": str(root / f"e{t}.safetensors")} for t in range(T)],
            "output": {"uri": str(root / f"out-{method}-{budget}"), "overwrite": True},
            "options": {"memory_budget": budget, "diagnostics": "off"}}
    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(spec)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_peak_rss_stays_within_the_budget_where_merging_whole_would_not(llm_like, method):
    blocked = _measure(llm_like, method, "64MiB")
    whole = _measure(llm_like, method, "8GiB")
    assert blocked["row_blocked"] >= 1 and whole["row_blocked"] == 0
    # what the merge added to the process: the jobs in flight (within the budget), plus a fixed
    # allowance for the worker threads' stacks and the output hashing's read buffers
    assert blocked["after"] - blocked["before"] < 64 * MiB + 32 * MiB, blocked
    # the same merge of the vocabulary table whole: its 16.8M entries held as read from the T + 1
    # bf16 inputs, and as written (merged in cache-sized tiles): 192 MiB, three times the budget
    assert whole["after"] - whole["before"] > 3 * 64 * MiB, whole


@pytest.mark.parametrize(("fixture", "method", "budget"), [
    ("llm_like", "task_arithmetic", "64MiB"),  # row blocks
    ("llm_like", "task_arithmetic", "8GiB"),  # the table whole
    ("wide_head", "weight_average", "128MiB"),  # another shape and dtype, in row blocks
])
def test_preflight_estimates_the_peak_within_a_quarter(request, fixture, method, budget):
    m = _measure(request.getfixturevalue(fixture), method, budget)
    assert abs(m["estimate"] - m["after"]) <= 0.25 * m["after"], m

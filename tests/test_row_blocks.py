"""Merging in row blocks under a memory budget: the same bytes as merging whole, for every method
that allows it; refusal, before any work, of a key a method needs whole and the budget cannot
hold; experts in another floating dtype than the base."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import merging
from merging.errors import IncompatibleCheckpointsError, MemoryBudgetError
from merging.plan import preflight

T = 3
# An LLM-shaped toy: a vocabulary table and an LM head large enough to be cut into row blocks,
# attention and MLP matrices small enough to be merged whole, norms, and a GPT-2 Conv1D weight
# stored transposed (DARE must not cut it: its masks are drawn in (out, in) order).
KEYS = {
    "model.embed_tokens.weight": (8000, 64),
    "model.layers.0.self_attn.q_proj.weight": (64, 64),
    "model.layers.0.mlp.up_proj.weight": (96, 64),
    "model.layers.0.input_layernorm.weight": (64,),
    "model.norm.weight": (64,),
    "lm_head.weight": (8000, 64),
    "transformer.h.0.mlp.c_fc.weight": (64, 1500),
}
BUDGET = "1MiB"
# Per method, a budget that cuts the vocabulary tables and holds what the method needs whole (the
# transposed c_fc for DARE and the SVD methods: 96k entries, 3.3 and 6.1 MB estimated peaks).
BUDGETS = {"dare": "8MiB", "tsv_m": "8MiB", "iso_c": "8MiB", "iso_cts": "8MiB"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rows")
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in KEYS.items()}
    save_file(base, str(root / "base.safetensors"))
    for t in range(T):
        # task vectors with structure (low rank) and ties (repeated magnitudes) for TIES, Consensus, Breadcrumbs
        e = {}
        for k, v in base.items():
            tau = 0.05 * torch.randn(s := v.shape, generator=g)
            if len(s) == 2:
                tau += 0.1 * torch.randn(s[0], 2, generator=g) @ torch.randn(2, s[1], generator=g)
            tau[..., :3] = 0.02  # equal magnitudes across rows and experts
            e[k] = v + tau
        save_file(e, str(root / f"e{t}.safetensors"))
    return root


def _spec(root, method, out, params=None, **options):
    return {"method": method, "params": params or {}, "base": {"uri": str(root / "base.safetensors")},
            "experts": [{"uri": str(root / f"e{t}.safetensors")} for t in range(T)],
            "output": {"uri": str(root / out), "overwrite": True},
            "options": {"diagnostics": "full", **options}}


def _merge(root, method, out, params=None, **options):
    result = merging.merge(_spec(root, method, out, params, **options))
    return load_file(str(root / out / "model.safetensors")), result


BLOCKED_EVERYWHERE = ["weight_average", "task_arithmetic", "ties", "dare", "consensus"]
MEAN_BLOCKED = ["tsv_m", "iso_c", "iso_cts"]  # the SVD methods: their vocabulary tables are the mean


@pytest.mark.parametrize("method", BLOCKED_EVERYWHERE + MEAN_BLOCKED)
@pytest.mark.parametrize("workers", [1, 2])
def test_row_blocks_give_the_same_bytes(inputs, method, workers):
    whole, whole_result = _merge(inputs, method, f"{method}-whole-{workers}", workers=workers)
    blocked, result = _merge(inputs, method, f"{method}-blocked-{workers}", workers=workers,
                             memory_budget=BUDGETS.get(method, BUDGET))
    for k in KEYS:
        assert torch.equal(whole[k], blocked[k]), k
    assert result.manifest["files"]["model.safetensors"]["sha256"] == whole_result.manifest["files"]["model.safetensors"]["sha256"]
    rows = {r["key"]: r for r in result.manifest["tensors"]}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        assert rows[key]["row_blocks"] > 1, key
    assert "row_blocks" not in rows["model.layers.0.self_attn.q_proj.weight"]  # small: merged whole
    if method in MEAN_BLOCKED:
        assert "row_blocks" not in rows["transformer.h.0.mlp.c_fc.weight"]  # a matrix: its SVD needs all of it
    elif method == "dare":
        assert "row_blocks" not in rows["transformer.h.0.mlp.c_fc.weight"]  # transposed: masks drawn in (out, in) order
    else:
        assert rows["transformer.h.0.mlp.c_fc.weight"]["row_blocks"] > 1
    # the diagnostics' norms and cosines add up over the blocks to the same numbers
    diag_whole = json.loads((inputs / f"{method}-whole-{workers}" / "diagnostics.json").read_text())
    diag_blocked = json.loads((inputs / f"{method}-blocked-{workers}" / "diagnostics.json").read_text())
    _assert_close(diag_blocked["model"], diag_whole["model"])


def _assert_close(a, b, path="model"):
    """Nested report values equal; numbers (rounded to 6 digits in the report, from float32 products
    that the blocks group differently) to 2e-5, or 1e-6 near 0."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=2e-5, abs=1e-6), path  # abs: cosines near 0
    else:
        assert a == b, path


def test_breadcrumbs_ranks_whole_tensors_and_the_budget_says_so(inputs):
    """Breadcrumbs ranks every entry of a tensor: it cannot be cut, so a key over the budget is refused."""
    whole, _ = _merge(inputs, "breadcrumbs", "bc-whole")
    with pytest.raises(MemoryBudgetError) as e:
        merging.merge(_spec(inputs, "breadcrumbs", "bc-blocked", memory_budget=BUDGET))
    assert "'lm_head.weight' (shape [8000, 64])" in str(e.value) and e.value.field == "options.memory_budget"
    assert not (inputs / "bc-blocked").exists()  # refused before any work: nothing staged or published
    _, result = _merge(inputs, "breadcrumbs", "bc-big", memory_budget="64MiB")
    assert "row_blocks" not in json.dumps(result.manifest["tensors"])


def test_a_matrix_the_budget_cannot_hold_is_refused_by_preflight_naming_it(inputs):
    with pytest.raises(MemoryBudgetError) as e:
        preflight(_spec(inputs, "tsv_m", "refused", memory_budget="1MiB"), memory_budget=None)
    # c_fc: 96k entries x (4 B x (3 x 4 + 3) + 4 B) = 6.1 MB whole, for TSV-M's float64 working copies
    assert "'transformer.h.0.mlp.c_fc.weight'" in str(e.value) and "tsv_m" in str(e.value)
    assert e.value.code == "memory_budget_exceeded"
    # the worker's budget caps the spec's: a large spec budget does not lift it
    with pytest.raises(MemoryBudgetError):
        preflight(_spec(inputs, "tsv_m", "refused", memory_budget="64GiB"), memory_budget=1 << 20)
    pf = preflight(_spec(inputs, "task_arithmetic", "fits", memory_budget=BUDGET))
    report = pf.memory.report(pf.plan)
    assert report["budget_bytes"] == 1 << 20
    assert {b["key"] for b in report["row_blocked"]} >= {"model.embed_tokens.weight", "lm_head.weight"}


def test_held_back_keys_in_row_blocks_reach_the_alpha_search_whole(inputs):
    """With α chosen by the caller, every key waits on disk; row-blocked keys come back whole, in
    checkpoint layout, and are written as with a fixed α."""
    seen = {}

    def choose(tv):
        for key in ("model.embed_tokens.weight", "transformer.h.0.mlp.c_fc.weight"):
            seen.setdefault(key, []).append(tv.read(key))
        return 0.7

    outs = []
    for name, budget in (("auto-whole", None), ("auto-blocked", BUDGET)):
        spec = _spec(inputs, "task_arithmetic", name, {"alpha": "auto"}, **({"memory_budget": budget} if budget else {}))
        spec["evaluation"] = {"tasks": [{"expert": "expert0", "test": {"uri": "t.jsonl"}, "validation": {"uri": "v.jsonl"},
                                         "labels": ["a", "b"]}]}  # what "auto" asks for; choose() stands in for it
        merging.merge(spec, choose_alpha=choose)
        outs.append(load_file(str(inputs / name / "model.safetensors")))
    fixed, _ = _merge(inputs, "task_arithmetic", "fixed", {"alpha": 0.7})
    for k in KEYS:
        assert torch.equal(outs[0][k], outs[1][k]) and torch.equal(outs[0][k], fixed[k]), k
    for key, (a, b) in seen.items():
        assert a.shape == KEYS[key] and torch.equal(a, b), key
    assert not any(p.name == ".spill" for p in inputs.rglob(".spill"))


def test_experts_in_another_floating_dtype_are_cast_like_the_base(tmp_path):
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(8, 6, generator=g).bfloat16(), "b": torch.randn(6, generator=g).bfloat16()}
    e16 = {k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).half() for k, v in base.items()}
    e32 = {k: v.float() + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    for name, sd in (("base", base), ("e16", e16), ("e32", e32)):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    spec = {"method": "task_arithmetic", "params": {"alpha": 0.5}, "base": {"uri": str(tmp_path / "base.safetensors")},
            "experts": [{"uri": str(tmp_path / "e16.safetensors")}, {"uri": str(tmp_path / "e32.safetensors")}],
            "output": {"uri": str(tmp_path / "out")}}
    merging.merge(spec)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k, v in base.items():
        expected = v.float() + 0.5 * ((e16[k].float() - v.float()) + (e32[k] - v.float()))
        assert out[k].dtype == torch.bfloat16  # output.dtype auto: the base's
        assert torch.equal(out[k], expected.bfloat16()), k


def test_a_non_floating_expert_tensor_is_still_incompatible(tmp_path):
    save_file({"w": torch.randn(4, 4)}, str(tmp_path / "base.safetensors"))
    save_file({"w": torch.randn(4, 4)}, str(tmp_path / "e0.safetensors"))
    save_file({"w": torch.ones(4, 4, dtype=torch.int32)}, str(tmp_path / "e1.safetensors"))
    spec = {"method": "task_arithmetic", "base": {"uri": str(tmp_path / "base.safetensors")},
            "experts": [{"uri": str(tmp_path / "e0.safetensors")}, {"uri": str(tmp_path / "e1.safetensors")}],
            "output": {"uri": str(tmp_path / "out")}}
    with pytest.raises(IncompatibleCheckpointsError, match=r"tensor 'w': expert 'expert1' has dtype I32, base has F32"):
        merging.merge(spec)


def test_copied_tensors_larger_than_a_tenth_of_the_budget_pass_in_row_blocks(inputs, monkeypatch):
    from merging.io.checkpoint import Checkpoint
    reads = []
    original = Checkpoint.read

    def read(self, key, out=None, rows=None):
        if key == "lm_head.weight" and self.label == "base":
            reads.append(rows)
        return original(self, key, out, rows)
    monkeypatch.setattr(Checkpoint, "read", read)
    merging.merge({**_spec(inputs, "task_arithmetic", "copied", memory_budget=BUDGET), "passthrough": ["lm_head.weight"]})
    out = load_file(str(inputs / "copied" / "model.safetensors"))
    base = load_file(str(inputs / "base.safetensors"))
    assert torch.equal(out["lm_head.weight"], base["lm_head.weight"])
    assert len(reads) > 1 and all(r is not None for r in reads)  # 2 MB in blocks of at most 1/10 MiB
    assert reads[0][0] == 0 and reads[-1][1] == 8000


def test_a_budget_below_one_mebibyte_is_a_spec_error(inputs):
    from merging.errors import SpecError
    with pytest.raises(SpecError, match=r"options.memory_budget.*at least 1 MiB"):
        merging.merge(_spec(inputs, "task_arithmetic", "tiny", memory_budget="512KiB"))
    with pytest.raises(SpecError, match=r"options.memory_budget.*not a size"):
        merging.merge(_spec(inputs, "task_arithmetic", "tiny", memory_budget="lots"))


@pytest.mark.parametrize("method", ["weight_average", "task_arithmetic", "ties", "dare", "consensus", "iso_c"])
def test_tiles_give_the_same_bytes_as_whole_jobs(inputs, method, monkeypatch):
    """Tiles of 9 rows of the tables, a few of the matrices, 585 entries of a norm (diagnostics off:
    every key the method merges row by row is tiled) against whole jobs: diagnostics 'full' analyse
    every matrix whole (no tiles), and tiles larger than any key leave one tile per job."""
    monkeypatch.setattr("merging.memory.TILE_BYTES", 16 << 10)
    tiny = merging.merge(_spec(inputs, method, f"tiny-{method}", diagnostics="off"))
    monkeypatch.setattr("merging.memory.TILE_BYTES", 1 << 40)
    whole = merging.merge(_spec(inputs, method, f"one-{method}"))
    assert tiny.manifest["files"]["model.safetensors"]["sha256"] == whole.manifest["files"]["model.safetensors"]["sha256"]


def test_an_empty_tensor_beside_tiled_ones(tmp_path):
    """A tensor with no rows has no tiles: it is merged whole (to nothing) and written with its shape."""
    b = {"a.weight": torch.randn(8, 4), "empty.weight": torch.zeros(0, 4), "n.weight": torch.randn(4)}
    save_file(b, str(tmp_path / "b.safetensors"))
    for t in range(2):
        save_file({k: v + 0.1 for k, v in b.items()}, str(tmp_path / f"e{t}.safetensors"))
    merging.merge({"method": "task_arithmetic", "base": {"uri": str(tmp_path / "b.safetensors")},
                   "experts": [{"uri": str(tmp_path / f"e{t}.safetensors")} for t in range(2)],
                   "output": {"uri": str(tmp_path / "out")}, "options": {"diagnostics": "off"}})
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert out["empty.weight"].shape == (0, 4) and torch.allclose(out["a.weight"], b["a.weight"] + 0.3 * 0.2)

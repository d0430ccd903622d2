"""Tied and untied LM heads between the base and its experts (merging/tied_heads.py): the output
keeps the base's tying, the coverage list says what was done, and an untied head that is not a
copy of its table is refused, naming the expert and both tensors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import merging
from merging.errors import IncompatibleCheckpointsError

V, D = 4000, 32
EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _model(g, untied: bool, head_from=None):
    sd = {EMB: torch.randn(V, D, generator=g), "model.norm.weight": torch.randn(D, generator=g),
          "model.layers.0.self_attn.q_proj.weight": torch.randn(D, D, generator=g)}
    if untied:
        sd[HEAD] = (head_from if head_from is not None else torch.randn(V, D, generator=g)).clone()
    return sd


def _finetune(g, sd):
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in sd.items()}


def _spec(tmp_path, names, out="out", **options):
    return {"method": "task_arithmetic", "params": {"alpha": 0.5}, "base": {"uri": str(tmp_path / "base.safetensors")},
            "experts": [{"uri": str(tmp_path / f"{n}.safetensors"), "name": n} for n in names],
            "output": {"uri": str(tmp_path / out)}, "options": options}


def test_base_untied_expert_tied_reads_the_experts_head_from_its_table(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = _model(g, untied=True)
    tied = _finetune(g, {k: v for k, v in base.items() if k != HEAD})  # saved tied: no head
    untied = _finetune(g, base)
    for name, sd in (("base", base), ("tied", tied), ("untied", untied)):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    result = merging.merge(_spec(tmp_path, ["tied", "untied"]))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(out) == set(base)  # the base's tying: untied
    expected = base[HEAD] + 0.5 * ((tied[EMB] - base[HEAD]) + (untied[HEAD] - base[HEAD]))
    assert torch.allclose(out[HEAD], expected, atol=1e-6)
    row = next(r for r in result.manifest["tensors"] if r["key"] == HEAD)
    assert row["note"] == f"expert 'tied' ties {HEAD} to {EMB} (no {HEAD} saved): its head is read from {EMB}"


@pytest.mark.parametrize("budget", [None, "1MiB"])  # whole, and compared row block by row block
def test_base_tied_expert_untied_copy_is_checked_and_dropped(tmp_path, budget):
    g = torch.Generator().manual_seed(1)
    base = _model(g, untied=False)
    e0 = _finetune(g, base)
    e0[HEAD] = e0[EMB].clone()  # saved untied, but the head is the table
    e1 = _finetune(g, base)
    for name, sd in (("base", base), ("e0", e0), ("e1", e1)):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    options = {"memory_budget": budget} if budget else {}
    result = merging.merge(_spec(tmp_path, ["e0", "e1"], **options))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert HEAD not in out and set(out) == set(base)  # the base's tying: tied
    assert torch.allclose(out[EMB], base[EMB] + 0.5 * ((e0[EMB] - base[EMB]) + (e1[EMB] - base[EMB])), atol=1e-6)
    row = next(r for r in result.manifest["tensors"] if r["key"] == EMB)
    assert "expert 'e0' saves an untied lm_head.weight" in row["note"] and "checked equal" in row["note"]
    if budget:
        assert row["row_blocks"] > 1


@pytest.mark.parametrize("budget", [None, "1MiB"])
def test_an_untied_head_that_differs_from_its_table_is_refused(tmp_path, budget):
    g = torch.Generator().manual_seed(2)
    base = _model(g, untied=False)
    e0 = _finetune(g, base)
    e0[HEAD] = e0[EMB].clone()
    e0[HEAD][-1, 0] += 1.0  # one entry of the last row differs
    e1 = _finetune(g, base)
    for name, sd in (("base", base), ("e0", e0), ("e1", e1)):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    options = {"memory_budget": budget} if budget else {}
    with pytest.raises(IncompatibleCheckpointsError) as e:
        merging.merge(_spec(tmp_path, ["e0", "e1"], **options))
    message = str(e.value)
    assert "expert 'e0' saves an untied 'lm_head.weight' that differs from its 'model.embed_tokens.weight'" in message
    assert "the base ties its head" in message
    if budget:
        assert f"..{V})" in message  # the row block that holds the difference: the last one
    assert not (tmp_path / "out").exists()


def test_gpt2_and_neox_names_pair_the_same_way(tmp_path):
    g = torch.Generator().manual_seed(3)
    for emb, head in (("transformer.wte.weight", "lm_head.weight"), ("gpt_neox.embed_in.weight", "embed_out.weight")):
        root = tmp_path / emb.split(".")[0]
        root.mkdir()
        base = {emb: torch.randn(V, D, generator=g), head: torch.randn(V, D, generator=g)}
        tied = {emb: base[emb] + 0.01}
        save_file(base, str(root / "base.safetensors"))
        save_file(tied, str(root / "t.safetensors"))
        save_file({k: v + 0.02 for k, v in base.items()}, str(root / "u.safetensors"))
        result = merging.merge({**_spec(root, ["t", "u"]), "options": {"diagnostics": "off"}})
        out = load_file(str(root / "out" / "model.safetensors"))
        assert torch.allclose(out[head], base[head] + 0.5 * ((tied[emb] - base[head]) + 0.02), atol=1e-5)
        assert json.dumps(result.manifest["tensors"]).count("ties") == 1

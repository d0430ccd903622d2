"""Layer roles inferred from key names for the common families, overrides, and the manifest record."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import merging
from merging.roles import Role, RoleOverride, infer_role, resolve_role

M = (8, 8)
CASES = [
    # open_clip
    ("visual.transformer.resblocks.0.attn.in_proj_weight", (24, 8), Role.attn_qkv, False),
    ("visual.transformer.resblocks.0.attn.out_proj.weight", M, Role.attn_out, False),
    ("visual.transformer.resblocks.0.mlp.c_fc.weight", (32, 8), Role.mlp_up, False),
    ("visual.transformer.resblocks.0.mlp.c_proj.weight", (8, 32), Role.mlp_down, False),
    ("visual.positional_embedding", (50, 8), Role.position_embedding, False),
    ("token_embedding.weight", (100, 8), Role.embedding, False),
    ("text_projection", (8, 8), Role.text_projection, False),
    ("visual.proj", (8, 4), Role.matrix, False),
    ("visual.transformer.resblocks.0.ln_1.weight", (8,), Role.norm, False),
    ("visual.transformer.resblocks.0.attn.in_proj_bias", (24,), Role.bias, False),
    ("visual.conv1.weight", (8, 3, 4, 4), Role.other, False),
    # HF CLIP / ViT
    ("vision_model.encoder.layers.0.self_attn.q_proj.weight", M, Role.attn_q, False),
    ("vision_model.encoder.layers.0.self_attn.k_proj.weight", M, Role.attn_k, False),
    ("vision_model.encoder.layers.0.self_attn.v_proj.weight", M, Role.attn_v, False),
    ("vision_model.encoder.layers.0.self_attn.out_proj.weight", M, Role.attn_out, False),
    ("vision_model.encoder.layers.0.mlp.fc1.weight", (32, 8), Role.mlp_up, False),
    ("vision_model.encoder.layers.0.mlp.fc2.weight", (8, 32), Role.mlp_down, False),
    ("vision_model.embeddings.position_embedding.weight", (50, 8), Role.position_embedding, False),
    ("visual_projection.weight", (4, 8), Role.matrix, False),
    ("vit.encoder.layer.0.attention.attention.query.weight", M, Role.attn_q, False),
    ("vit.encoder.layer.0.attention.output.dense.weight", M, Role.attn_out, False),
    # BERT / RoBERTa
    ("bert.embeddings.word_embeddings.weight", (100, 8), Role.embedding, False),
    ("bert.embeddings.position_embeddings.weight", (64, 8), Role.position_embedding, False),
    ("bert.embeddings.token_type_embeddings.weight", (2, 8), Role.embedding, False),
    ("encoder.layer.0.attention.self.query.weight", M, Role.attn_q, False),
    ("encoder.layer.0.attention.self.key.weight", M, Role.attn_k, False),
    ("encoder.layer.0.attention.self.value.weight", M, Role.attn_v, False),
    ("encoder.layer.0.attention.output.dense.weight", M, Role.attn_out, False),
    ("encoder.layer.0.intermediate.dense.weight", (32, 8), Role.mlp_up, False),
    ("encoder.layer.0.output.dense.weight", (8, 32), Role.mlp_down, False),
    ("encoder.layer.0.attention.output.LayerNorm.weight", (8,), Role.norm, False),
    ("roberta.encoder.layer.3.output.dense.weight", (8, 32), Role.mlp_down, False),
    ("pooler.dense.weight", M, Role.matrix, False),
    # GPT-2: Conv1D weights stored (in, out)
    ("transformer.h.0.attn.c_attn.weight", (8, 24), Role.attn_qkv, True),
    ("transformer.h.0.attn.c_proj.weight", M, Role.attn_out, True),
    ("transformer.h.0.mlp.c_fc.weight", (8, 32), Role.mlp_up, True),
    ("transformer.h.0.mlp.c_proj.weight", (32, 8), Role.mlp_down, True),
    ("transformer.wte.weight", (100, 8), Role.embedding, False),
    ("transformer.wpe.weight", (64, 8), Role.position_embedding, False),
    ("lm_head.weight", (100, 8), Role.lm_head, False),
    # Llama / Mistral / Qwen
    ("model.embed_tokens.weight", (100, 8), Role.embedding, False),
    ("model.layers.0.self_attn.q_proj.weight", M, Role.attn_q, False),
    ("model.layers.0.self_attn.o_proj.weight", M, Role.attn_out, False),
    ("model.layers.0.mlp.gate_proj.weight", (32, 8), Role.mlp_gate, False),
    ("model.layers.0.mlp.up_proj.weight", (32, 8), Role.mlp_up, False),
    ("model.layers.0.mlp.down_proj.weight", (8, 32), Role.mlp_down, False),
    ("model.layers.0.input_layernorm.weight", (8,), Role.norm, False),
    ("model.norm.weight", (8,), Role.norm, False),
    # T5
    ("shared.weight", (100, 8), Role.embedding, False),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", M, Role.attn_q, False),
    ("encoder.block.0.layer.0.SelfAttention.o.weight", M, Role.attn_out, False),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (32, 4), Role.position_embedding, False),
    ("encoder.block.0.layer.1.DenseReluDense.wi.weight", (32, 8), Role.mlp_up, False),
    ("encoder.block.0.layer.1.DenseReluDense.wi_0.weight", (32, 8), Role.mlp_gate, False),
    ("encoder.block.0.layer.1.DenseReluDense.wi_1.weight", (32, 8), Role.mlp_up, False),
    ("encoder.block.0.layer.1.DenseReluDense.wo.weight", (8, 32), Role.mlp_down, False),
]


@pytest.mark.parametrize("key,shape,role,transposed", CASES, ids=[c[0] for c in CASES])
def test_inferred_roles(key, shape, role, transposed):
    info = infer_role(key, shape)
    assert (info.role, info.transposed) == (role, transposed)


def test_override_first_match_wins():
    overrides = [RoleOverride("*.mystery.weight", Role.mlp_up, transposed=True), RoleOverride("*", Role.matrix)]
    info = resolve_role("blk.mystery.weight", (4, 8), overrides)
    assert (info.role, info.transposed, info.source) == (Role.mlp_up, True, "*.mystery.weight")
    assert resolve_role("other.weight", (4, 4), overrides).role == Role.matrix


def test_manifest_records_roles_and_transposition(tmp_path):
    """GPT-2 Conv1D weights are merged as (out, in): for Iso-CTS, whose common-space projection is
    on the output side, storing orientation matters. The manifest says what each tensor got."""
    torch.manual_seed(0)
    key = "transformer.h.0.attn.c_attn.weight"
    base = {key: torch.zeros(16, 48), "transformer.h.0.ln_1.weight": torch.ones(16)}
    save_file(base, str(tmp_path / "base.safetensors"))
    experts, tvs = [], []
    for t in range(3):
        tv = torch.randn(48, 16) @ torch.randn(16, 16) * 0.01  # (out, in)
        tvs.append(tv.double())
        save_file({key: tv.T.contiguous(), "transformer.h.0.ln_1.weight": torch.ones(16)}, str(tmp_path / f"e{t}.safetensors"))
        experts.append(str(tmp_path / f"e{t}.safetensors"))
    spec = {"method": "iso_cts", "params": {"alpha": 1.0}, "base": {"uri": str(tmp_path / "base.safetensors")},
            "experts": [{"uri": e} for e in experts], "output": {"uri": str(tmp_path / "out"), "dtype": "float64"},
            "options": {"compute_dtype": "float64"},
            "roles": [{"pattern": "*.ln_1.weight", "role": "other"}]}
    merging.merge(spec)
    from safetensors.torch import load_file

    from tests.reference import iso_cts
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.allclose(out[key], iso_cts(tvs).T, atol=1e-12)
    manifest = json.loads((tmp_path / "out" / "merge.json").read_text())
    rows = {r["key"]: r for r in manifest["tensors"]}
    assert rows[key]["role"] == "attn_qkv" and rows[key]["transposed"] is True and rows[key]["role_source"] == "inferred"
    assert rows["transformer.h.0.ln_1.weight"]["role"] == "other"
    assert rows["transformer.h.0.ln_1.weight"]["role_source"] == "*.ln_1.weight"

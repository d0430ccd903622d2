"""Layer roles of the LLM families, from their Hugging Face key names, and the row layouts of
their fused weights (Phi-3's qkv_proj and gate_up_proj, GPT-NeoX's per-head query_key_value).

Each family's list is a 1-2 layer, small-width version of the keys and shapes its checkpoints
hold (checked against the transformers modules: hidden 16, 4 heads, 2 KV heads, MLP 40,
vocabulary 64). Every key must get its role from a name rule (source "inferred"), none from the
generic fallback.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from merging.roles import (
    SOURCE_GENERIC, SOURCE_INFERRED, FusedLayout, Role, RoleInfo, RoleOverride, infer_role, resolve_role,
)

E, P, LM = Role.embedding, Role.position_embedding, Role.lm_head
QKV, Q, K, V, O = Role.attn_qkv, Role.attn_q, Role.attn_k, Role.attn_v, Role.attn_out
UP, GATE, DOWN = Role.mlp_up, Role.mlp_gate, Role.mlp_down
MAT, NORM, BIAS, OTHER = Role.matrix, Role.norm, Role.bias, Role.other

HID, INTER, VOCAB = 16, 40, 64


def layers(prefix: str, n: int, rows: list[tuple]) -> list[tuple]:
    """``rows`` (with ``{L}`` for the layer's prefix) for layers 0 … n-1 under ``prefix``."""
    return [(k.format(L=f"{prefix}.{i}"), shape, role, t) for i in range(n) for k, shape, role, t in rows]


def llama_layer(head_dim: int = 4, heads: int = 4, kv_heads: int = 2, qkv_bias: bool = False, qk_norm: bool = False,
                mlp: list[tuple] | None = None, sandwich_norms: bool = False) -> list[tuple]:
    q, kv = heads * head_dim, kv_heads * head_dim
    rows = [
        ("{L}.self_attn.q_proj.weight", (q, HID), Q, False),
        ("{L}.self_attn.k_proj.weight", (kv, HID), K, False),
        ("{L}.self_attn.v_proj.weight", (kv, HID), V, False),
        ("{L}.self_attn.o_proj.weight", (HID, q), O, False),
        ("{L}.input_layernorm.weight", (HID,), NORM, False),
        ("{L}.post_attention_layernorm.weight", (HID,), NORM, False),
    ]
    if qkv_bias:
        rows += [("{L}.self_attn.q_proj.bias", (q,), BIAS, False), ("{L}.self_attn.k_proj.bias", (kv,), BIAS, False),
                 ("{L}.self_attn.v_proj.bias", (kv,), BIAS, False)]
    if qk_norm:
        rows += [("{L}.self_attn.q_norm.weight", (head_dim,), NORM, False), ("{L}.self_attn.k_norm.weight", (head_dim,), NORM, False)]
    if sandwich_norms:  # Gemma 2/3
        rows += [("{L}.pre_feedforward_layernorm.weight", (HID,), NORM, False),
                 ("{L}.post_feedforward_layernorm.weight", (HID,), NORM, False)]
    rows += mlp if mlp is not None else [
        ("{L}.mlp.gate_proj.weight", (INTER, HID), GATE, False),
        ("{L}.mlp.up_proj.weight", (INTER, HID), UP, False),
        ("{L}.mlp.down_proj.weight", (HID, INTER), DOWN, False),
    ]
    return rows


def decoder(layer: list[tuple], prefix: str = "model", n: int = 2, lm_head: str | None = "lm_head.weight") -> list[tuple]:
    rows = [(f"{prefix}.embed_tokens.weight", (VOCAB, HID), E, False), *layers(f"{prefix}.layers", n, layer),
            (f"{prefix}.norm.weight", (HID,), NORM, False)]
    return rows + ([(lm_head, (VOCAB, HID), LM, False)] if lm_head else [])


def siglip_tower(prefix: str, width: int = 24, mlp: int = 48) -> list[tuple]:
    """Gemma 3's SigLIP vision tower (no attention-pooling head: vision_use_head is false)."""
    layer = [
        ("{L}.layer_norm1.weight", (width,), NORM, False), ("{L}.layer_norm1.bias", (width,), BIAS, False),
        ("{L}.self_attn.q_proj.weight", (width, width), Q, False), ("{L}.self_attn.q_proj.bias", (width,), BIAS, False),
        ("{L}.self_attn.k_proj.weight", (width, width), K, False), ("{L}.self_attn.k_proj.bias", (width,), BIAS, False),
        ("{L}.self_attn.v_proj.weight", (width, width), V, False), ("{L}.self_attn.v_proj.bias", (width,), BIAS, False),
        ("{L}.self_attn.out_proj.weight", (width, width), O, False), ("{L}.self_attn.out_proj.bias", (width,), BIAS, False),
        ("{L}.layer_norm2.weight", (width,), NORM, False), ("{L}.layer_norm2.bias", (width,), BIAS, False),
        ("{L}.mlp.fc1.weight", (mlp, width), UP, False), ("{L}.mlp.fc1.bias", (mlp,), BIAS, False),
        ("{L}.mlp.fc2.weight", (width, mlp), DOWN, False), ("{L}.mlp.fc2.bias", (width,), BIAS, False),
    ]
    return [
        (f"{prefix}.embeddings.patch_embedding.weight", (width, 3, 14, 14), OTHER, False),
        (f"{prefix}.embeddings.patch_embedding.bias", (width,), BIAS, False),
        (f"{prefix}.embeddings.position_embedding.weight", (16, width), P, False),
        *layers(f"{prefix}.encoder.layers", 1, layer),
        (f"{prefix}.post_layernorm.weight", (width,), NORM, False),
        (f"{prefix}.post_layernorm.bias", (width,), BIAS, False),
    ]


def gemma3_projector(prefix: str, width: int = 24) -> list[tuple]:
    # mm_input_projection_weight is a raw (vision, text) parameter applied as x @ W: stored (in, out)
    return [(f"{prefix}.mm_input_projection_weight", (width, HID), MAT, True),
            (f"{prefix}.mm_soft_emb_norm.weight", (width,), NORM, False)]


GEMMA_LAYER = dict(head_dim=8, sandwich_norms=True)  # Gemma: head_dim·heads ≠ hidden

NEOX_LAYER = [
    ("{L}.input_layernorm.weight", (HID,), NORM, False), ("{L}.input_layernorm.bias", (HID,), BIAS, False),
    ("{L}.post_attention_layernorm.weight", (HID,), NORM, False), ("{L}.post_attention_layernorm.bias", (HID,), BIAS, False),
    ("{L}.attention.query_key_value.weight", (3 * HID, HID), QKV, False),
    ("{L}.attention.query_key_value.bias", (3 * HID,), BIAS, False),
    ("{L}.attention.dense.weight", (HID, HID), O, False), ("{L}.attention.dense.bias", (HID,), BIAS, False),
    ("{L}.mlp.dense_h_to_4h.weight", (4 * HID, HID), UP, False), ("{L}.mlp.dense_h_to_4h.bias", (4 * HID,), BIAS, False),
    ("{L}.mlp.dense_4h_to_h.weight", (HID, 4 * HID), DOWN, False), ("{L}.mlp.dense_4h_to_h.bias", (HID,), BIAS, False),
    # buffers that older (Pythia) checkpoints hold: the causal mask (bool), the mask value, rotary inv_freq
    ("{L}.attention.bias", (1, 1, 32, 32), OTHER, False),
    ("{L}.attention.masked_bias", (), OTHER, False),
    ("{L}.attention.rotary_emb.inv_freq", (2,), OTHER, False),
]

MIXTRAL_MLP = [("{L}.block_sparse_moe.gate.weight", (2, HID), MAT, False)] + [
    row for e in range(2) for row in (
        (f"{{L}}.block_sparse_moe.experts.{e}.w1.weight", (INTER, HID), GATE, False),
        (f"{{L}}.block_sparse_moe.experts.{e}.w2.weight", (HID, INTER), DOWN, False),
        (f"{{L}}.block_sparse_moe.experts.{e}.w3.weight", (INTER, HID), UP, False),
    )
]


def qwen_moe_mlp(shared: bool, moe_inter: int = 12, shared_inter: int = 20) -> list[tuple]:
    rows = [("{L}.mlp.gate.weight", (2, HID), MAT, False)] + [
        row for e in range(2) for row in (
            (f"{{L}}.mlp.experts.{e}.gate_proj.weight", (moe_inter, HID), GATE, False),
            (f"{{L}}.mlp.experts.{e}.up_proj.weight", (moe_inter, HID), UP, False),
            (f"{{L}}.mlp.experts.{e}.down_proj.weight", (HID, moe_inter), DOWN, False),
        )
    ]
    if shared:  # Qwen2-MoE only
        rows += [("{L}.mlp.shared_expert.gate_proj.weight", (shared_inter, HID), GATE, False),
                 ("{L}.mlp.shared_expert.up_proj.weight", (shared_inter, HID), UP, False),
                 ("{L}.mlp.shared_expert.down_proj.weight", (HID, shared_inter), DOWN, False),
                 ("{L}.mlp.shared_expert_gate.weight", (1, HID), MAT, False)]
    return rows


FAMILIES: dict[str, list[tuple]] = {
    "llama3": decoder(llama_layer()),
    "mistral": decoder(llama_layer()),
    "qwen2": decoder(llama_layer(qkv_bias=True)),
    "qwen2_tied": decoder(llama_layer(qkv_bias=True), lm_head=None),  # Qwen2-0.5B/1.5B tie the LM head
    "qwen3": decoder(llama_layer(qk_norm=True)),
    "gemma2": decoder(llama_layer(**GEMMA_LAYER), lm_head=None),
    "gemma3_text": decoder(llama_layer(qk_norm=True, **GEMMA_LAYER), lm_head=None),
    # Gemma3ForConditionalGeneration as released on the Hub ...
    "gemma3_multimodal": decoder(llama_layer(qk_norm=True, **GEMMA_LAYER), prefix="language_model.model", lm_head=None)
    + siglip_tower("vision_tower.vision_model") + gemma3_projector("multi_modal_projector"),
    # ... and as transformers >= 4.52 saves it
    "gemma3_multimodal_new_prefix": decoder(llama_layer(qk_norm=True, **GEMMA_LAYER), prefix="model.language_model")
    + siglip_tower("model.vision_tower.vision_model") + gemma3_projector("model.multi_modal_projector"),
    "phi3": decoder([
        ("{L}.self_attn.qkv_proj.weight", (HID + 2 * 8, HID), QKV, False),  # 4 heads, 2 KV heads of 4
        ("{L}.self_attn.o_proj.weight", (HID, HID), O, False),
        ("{L}.mlp.gate_up_proj.weight", (2 * INTER, HID), UP, False),  # fused [gate; up]: RoleInfo.fused
        ("{L}.mlp.down_proj.weight", (HID, INTER), DOWN, False),
        ("{L}.input_layernorm.weight", (HID,), NORM, False),
        ("{L}.post_attention_layernorm.weight", (HID,), NORM, False),
    ]),
    "gpt_neox": [("gpt_neox.embed_in.weight", (VOCAB, HID), E, False), *layers("gpt_neox.layers", 2, NEOX_LAYER),
                 ("gpt_neox.final_layer_norm.weight", (HID,), NORM, False), ("gpt_neox.final_layer_norm.bias", (HID,), BIAS, False),
                 ("embed_out.weight", (VOCAB, HID), LM, False)],
    "mixtral": decoder(llama_layer(mlp=MIXTRAL_MLP)),
    "qwen2_moe": decoder(llama_layer(qkv_bias=True, mlp=qwen_moe_mlp(shared=True))),
    "qwen3_moe": decoder(llama_layer(qk_norm=True, mlp=qwen_moe_mlp(shared=False))),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_roles(family):
    rows = FAMILIES[family]
    assert len({k for k, *_ in rows}) == len(rows), "duplicate keys in the family's list"
    wrong = []
    for key, shape, role, transposed in rows:
        info = infer_role(key, shape)
        if (info.role, info.transposed, info.source) != (role, transposed, SOURCE_INFERRED):
            wrong.append(f"{key} {shape}: got {info.role.value}, transposed={info.transposed}, source={info.source!r}; "
                         f"expected {role.value}, transposed={transposed}")
    assert not wrong, "\n".join(wrong)


def _gather(w: torch.Tensor, spans) -> torch.Tensor:
    return torch.cat([w[a:b] for a, b in spans])


def test_phi3_fused_layouts():
    """Phi-3: q, k, v = qkv[..., :H·d], qkv[..., H·d : H·d + KV·d], the rest; gate, up = gate_up.chunk(2)."""
    torch.manual_seed(0)
    heads, kv_heads, head_dim, hidden = 4, 2, 4, 16
    config = {"model_type": "phi3", "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": kv_heads}
    n_q, n_kv = heads * head_dim, kv_heads * head_dim
    w = torch.randn(n_q + 2 * n_kv, hidden, dtype=torch.float64)
    x = torch.randn(3, hidden, dtype=torch.float64)
    qkv = x @ w.T
    expected = (qkv[:, :n_q], qkv[:, n_q:n_q + n_kv], qkv[:, n_q + n_kv:])
    key = "model.layers.0.self_attn.qkv_proj.weight"
    for cfg in (config, SimpleNamespace(**config), None):  # without a config: Q as wide as the input
        info = infer_role(key, tuple(w.shape), cfg)
        assert info.role == QKV and info.fused == FusedLayout(("q", "k", "v"), (n_q, n_kv, n_kv))
        spans = info.part_spans(w.shape[0])
        for part, want in zip(spans, expected):
            assert torch.allclose(x @ _gather(w, part).T, want, atol=1e-12)
    # Phi-3-mini (as many KV heads as heads): equal thirds
    assert infer_role(key, (3 * hidden, hidden)).part_spans(3 * hidden) == (((0, 16),), ((16, 32),), ((32, 48),))

    inter = 10
    gu = torch.randn(2 * inter, hidden, dtype=torch.float64)
    info = infer_role("model.layers.0.mlp.gate_up_proj.weight", tuple(gu.shape))
    assert (info.role, info.fused) == (UP, FusedLayout(("gate", "up")))
    gate, up = (x @ gu.T).chunk(2, dim=-1)
    g_spans, u_spans = info.part_spans(gu.shape[0])
    assert torch.allclose(x @ _gather(gu, g_spans).T, gate, atol=1e-12) and torch.allclose(x @ _gather(gu, u_spans).T, up, atol=1e-12)
    # the separate gate/up projections of Llama carry no layout
    assert infer_role("model.layers.0.mlp.up_proj.weight", (inter, hidden)).fused is None


def test_gpt_neox_qkv_is_interleaved_per_head():
    """GPT-NeoX: qkv.view(..., H, 3·d).chunk(3, dim=-1): rows are [q_h; k_h; v_h] for each head,
    so Q, K and V are not the thirds of the rows; the head count comes from the config."""
    torch.manual_seed(0)
    heads, head_dim = 4, 4
    hidden = heads * head_dim
    w = torch.randn(3 * hidden, hidden, dtype=torch.float64)
    x = torch.randn(5, hidden, dtype=torch.float64)
    q, k, v = (x @ w.T).view(5, heads, 3 * head_dim).chunk(3, dim=-1)
    expected = [t.reshape(5, hidden) for t in (q, k, v)]
    config = {"model_type": "gpt_neox", "hidden_size": hidden, "num_attention_heads": heads}
    for key, cfg in [("gpt_neox.layers.0.attention.query_key_value.weight", config),
                     ("gpt_neox.layers.0.attention.query_key_value.weight", SimpleNamespace(**config)),
                     ("layers.0.attention.query_key_value.weight", {"num_attention_heads": heads}),  # bare GPTNeoXModel
                     ("h.0.query_key_value.weight", config)]:  # the name alone does not say; model_type does
        info = infer_role(key, tuple(w.shape), cfg)
        assert info.role == QKV and not info.transposed
        assert info.fused == FusedLayout(("q", "k", "v"), groups=heads)
        spans = info.part_spans(w.shape[0])
        assert spans[0] == tuple((h * 3 * head_dim, h * 3 * head_dim + head_dim) for h in range(heads))
        for part, want in zip(spans, expected):
            assert torch.allclose(x @ _gather(w, part).T, want, atol=1e-12)
        thirds = w.chunk(3)
        assert not torch.allclose(x @ thirds[0].T, expected[0])  # what an equal-thirds split would take for Q
    # Without the config the head count is unknown: no split rather than a wrong one
    info = infer_role("gpt_neox.layers.0.attention.query_key_value.weight", tuple(w.shape))
    assert info.fused == FusedLayout(("q", "k", "v"), groups=None) and info.part_spans(w.shape[0]) is None
    # A head count that does not divide the rows is not used
    bad = infer_role("gpt_neox.layers.0.attention.query_key_value.weight", tuple(w.shape), {"num_attention_heads": 5})
    assert bad.fused.groups is None and bad.part_spans(w.shape[0]) is None


def test_other_query_key_value_layouts_are_not_guessed():
    """Bloom (per head), Falcon (per KV group) and ChatGLM (concatenated) name their fused Q/K/V
    self_attention.query_key_value: not equal thirds, and not known from the name."""
    info = infer_role("transformer.h.0.self_attention.query_key_value.weight", (48, 16))
    assert info.role == QKV and info.fused is not None and info.part_spans(48) is None


def test_unrecorded_fused_qkv_keeps_equal_thirds():
    """open_clip's in_proj, GPT-2's c_attn (stored (in, out): rows of the (out, in) view) and timm's
    qkv are [Q; K; V] of equal size: no layout recorded, part_spans gives the thirds as before."""
    assert infer_role("visual.transformer.resblocks.0.attn.in_proj_weight", (24, 8)).part_spans(24) == (
        ((0, 8),), ((8, 16),), ((16, 24),))
    c_attn = infer_role("transformer.h.0.attn.c_attn.weight", (8, 24))
    assert c_attn.transposed and c_attn.fused is None and c_attn.part_spans(24) == (((0, 8),), ((8, 16),), ((16, 24),))
    assert infer_role("blocks.0.attn.qkv.weight", (25, 8)).part_spans(25) is None
    assert infer_role("model.layers.0.self_attn.q_proj.weight", (8, 8)).part_spans(8) is None


def test_layout_spans_reject_what_does_not_fit():
    layout = FusedLayout(("q", "k", "v"), (8, 4, 4))
    assert layout.spans(16) == (((0, 8),), ((8, 12),), ((12, 16),))
    assert layout.spans(18) is None
    assert FusedLayout(("q", "k", "v"), (8, 4, 4), groups=2).spans(32) == (
        ((0, 8), (16, 24)), ((8, 12), (24, 28)), ((12, 16), (28, 32)))
    assert FusedLayout(("gate", "up")).spans(7) is None
    assert FusedLayout(("q", "k", "v"), groups=None).spans(48) is None


def test_unknown_keys_fall_back_to_generic_roles():
    cases = [("visual.proj", (8, 4), MAT), ("classifier.weight", (3, 8), MAT), ("logit_scale", (), OTHER),
             ("visual.class_embedding", (8,), OTHER), ("blk.mystery", (2, 3, 4), OTHER)]
    for key, shape, role in cases:
        info = infer_role(key, shape)
        assert (info.role, info.transposed, info.source, info.fused) == (role, False, SOURCE_GENERIC, None), key
        assert info.to_json() == {"role": role.value, "transposed": False, "source": "generic"}
    # recognised keys keep the source they had, and overrides their pattern
    assert infer_role("model.layers.0.mlp.up_proj.weight", (40, 16)).source == "inferred"
    assert infer_role("model.norm.weight", (16,)).source == "inferred"
    assert resolve_role("visual.proj", (8, 4), [RoleOverride("visual.*", Role.mlp_up)]).source == "visual.*"


def test_layout_in_json_and_overrides():
    key, shape = "gpt_neox.layers.0.attention.query_key_value.weight", (48, 16)
    config = {"model_type": "gpt_neox", "num_attention_heads": 4}
    info = resolve_role(key, shape, [], config)
    assert info.to_json() == {"role": "attn_qkv", "transposed": False, "source": "inferred",
                              "fused": {"parts": ["q", "k", "v"], "sizes": None, "groups": 4}}
    kept = resolve_role(key, shape, [RoleOverride("*.query_key_value.weight", QKV)], config)
    assert kept.fused == info.fused and kept.source == "*.query_key_value.weight"
    dropped = resolve_role(key, shape, [RoleOverride("*.query_key_value.weight", MAT)], config)
    assert dropped.fused is None and dropped.part_spans(48) is None
    # the layout is read from text_config in multimodal configs too
    nested = {"model_type": "x", "text_config": {"hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 1}}
    assert infer_role("language_model.model.layers.0.self_attn.qkv_proj.weight", (24, 16), nested).fused.sizes == (16, 4, 4)
    assert RoleInfo(QKV) == RoleInfo(QKV, False, "inferred", None)


def test_subspace_boosting_boosts_neox_q_k_v_each_as_its_own_matrix():
    """Per-Q/K/V boosting (split_qkv) follows the recorded layout: for GPT-NeoX each part is the
    head-interleaved rows, boosted apart; equal thirds keep what chunk(3) gave."""
    from merging.methods.subspace_boosting import SubspaceBoostingParams, apply_subspace_boosting, boost_matrix
    heads, head_dim = 4, 3
    hidden = heads * head_dim
    merged = torch.randn(3 * hidden, hidden, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    params = SubspaceBoostingParams(attention_beta=0.5)
    role = infer_role("gpt_neox.layers.0.attention.query_key_value.weight", tuple(merged.shape),
                      {"model_type": "gpt_neox", "hidden_size": hidden, "num_attention_heads": heads})
    out = apply_subspace_boosting(merged, role, params)
    per_head = merged.view(heads, 3 * head_dim, hidden)
    for part in range(3):  # q, k, v: rows part·d .. (part+1)·d of every head's block
        rows = per_head[:, part * head_dim:(part + 1) * head_dim].reshape(-1, hidden)
        got = out.view(heads, 3 * head_dim, hidden)[:, part * head_dim:(part + 1) * head_dim].reshape(-1, hidden)
        assert torch.equal(got, boost_matrix(rows, 0.5, params.mode))
    thirds = infer_role("visual.transformer.resblocks.0.attn.in_proj_weight", tuple(merged.shape))
    assert torch.equal(apply_subspace_boosting(merged, thirds, params),
                       torch.cat([boost_matrix(b, 0.5, params.mode) for b in merged.chunk(3)]))

"""Layer roles inferred from tensor key names.

Roles decide how a tensor is merged: which tensors the SVD methods treat as matrices, which
layers ESM decomposes along activation shifts, which Subspace Boosting lifts (and with which
β), and which weights are stored transposed (GPT-2's Conv1D keeps (in, out)). A spec can
override any inference with glob patterns; the manifest records the role every tensor got.

Families covered by name rules: open_clip, HF CLIP/ViT/SigLIP, BERT/RoBERTa, GPT-2, T5, Llama 3,
Mistral, Qwen2/Qwen3, Gemma 2/Gemma 3 (text and multimodal, either key prefix), Phi-3, GPT-NeoX,
Mixtral and Qwen2-MoE/Qwen3-MoE. A key no rule recognises falls back to the generic role of its
shape (2-D: ``matrix``, else ``other``) with ``source="generic"``.

Fused weights keep the role of what they compute (``attn_qkv`` for a fused Q/K/V, ``mlp_up`` for
Phi-3's fused ``gate_up_proj``, which every consumer treats like an up projection) and record
their row layout in ``RoleInfo.fused`` (a ``FusedLayout``): Phi-3's ``qkv_proj`` is [Q; K; V]
with grouped-query K/V blocks smaller than Q, its ``gate_up_proj`` is [gate; up], and GPT-NeoX's
``query_key_value`` is interleaved per head, [q_h; k_h; v_h] for h = 0 … H−1 (H from the config).
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any


class Role(str, Enum):
    embedding = "embedding"  # token / word embeddings (vocabulary tables)
    position_embedding = "position_embedding"
    lm_head = "lm_head"
    text_projection = "text_projection"  # open_clip text projection: excluded from SVD merging (ALGORITHMS §0)
    attn_qkv = "attn_qkv"  # fused Q/K/V (its row layout: RoleInfo.fused)
    attn_q = "attn_q"
    attn_k = "attn_k"
    attn_v = "attn_v"
    attn_out = "attn_out"
    mlp_up = "mlp_up"  # also Phi-3's fused gate_up_proj (RoleInfo.fused says [gate; up])
    mlp_gate = "mlp_gate"
    mlp_down = "mlp_down"
    matrix = "matrix"  # any other 2-D weight (projections, poolers, classifier weights, MoE routers)
    norm = "norm"
    bias = "bias"
    other = "other"  # scalars, conv kernels, class tokens, buffers


ATTENTION_ROLES = frozenset({Role.attn_qkv, Role.attn_q, Role.attn_k, Role.attn_v, Role.attn_out})
LINEAR_ROLES = ATTENTION_ROLES | {Role.mlp_up, Role.mlp_gate, Role.mlp_down}
# 2-D tensors that the SVD methods merge by the arithmetic mean instead of as matrices:
# open_clip's text_projection (official code) and vocabulary tables / LM heads (the LLM ports).
NON_MATRIX_2D_ROLES = frozenset({Role.embedding, Role.lm_head, Role.text_projection})

# RoleInfo.source values set here ("non-floating buffer" is set by the plan, an override's glob
# pattern by resolve_role).
SOURCE_INFERRED = "inferred"  # a name rule recognised the key
SOURCE_GENERIC = "generic"  # no name rule did: the generic role of the shape (2-D: matrix, else other)


def is_matrix(role: "RoleInfo", shape: tuple[int, ...]) -> bool:
    """The SVD methods' matrix test (ALGORITHMS.md §0): 2-D and not a vocabulary/LM-head/text-projection table."""
    return len(shape) == 2 and role.role not in NON_MATRIX_2D_ROLES


Spans = tuple[tuple[tuple[int, int], ...], ...]


@dataclass(frozen=True)
class FusedLayout:
    """Row layout of a fused weight in its (out, in) orientation: ``groups`` consecutive groups of
    rows, each the concatenation of ``parts`` of ``sizes`` rows (``sizes`` None: equal shares).
    ``groups=1`` is a plain concatenation (Phi-3's [Q; K; V] and [gate; up]); GPT-NeoX's
    ``query_key_value`` has one group per attention head, [q_h; k_h; v_h]. ``groups`` None: the
    rows are interleaved in a way the name and shape do not tell (the model config is needed)."""

    parts: tuple[str, ...]
    sizes: tuple[int, ...] | None = None
    groups: int | None = 1

    def spans(self, n_rows: int) -> Spans | None:
        """For each part, its row spans [a, b), in order; None when the layout is not known or
        does not fit ``n_rows``. Gathering a part's spans gives that part's own (out, in) matrix."""
        if self.groups is None or self.groups < 1 or n_rows <= 0 or n_rows % self.groups:
            return None
        per_group = n_rows // self.groups
        if self.sizes is None:
            if per_group % len(self.parts):
                return None
            sizes = (per_group // len(self.parts),) * len(self.parts)
        else:
            sizes = self.sizes
            if len(sizes) != len(self.parts) or sum(sizes) != per_group or min(sizes) <= 0:
                return None
        out: list[list[tuple[int, int]]] = [[] for _ in self.parts]
        for g in range(self.groups):
            start = g * per_group
            for i, size in enumerate(sizes):
                out[i].append((start, start + size))
                start += size
        return tuple(tuple(p) for p in out)

    def to_json(self) -> dict:
        return {"parts": list(self.parts), "sizes": None if self.sizes is None else list(self.sizes), "groups": self.groups}


@dataclass(frozen=True)
class RoleInfo:
    role: Role
    transposed: bool = False  # stored as (in, out); methods see it as (out, in)
    # "inferred" (a name rule), "generic" (no rule: the shape's generic role), "non-floating buffer"
    # (plan), or the override pattern that set it
    source: str = SOURCE_INFERRED
    fused: FusedLayout | None = None  # row layout of a fused weight (None: not fused, or not recorded)

    def to_json(self) -> dict:
        out = {"role": self.role.value, "transposed": self.transposed, "source": self.source}
        if self.fused is not None:
            out["fused"] = self.fused.to_json()
        return out

    def part_spans(self, n_rows: int) -> Spans | None:
        """Row spans of the blocks a fused weight is made of, in the (out, in) orientation (see
        ``FusedLayout.spans``): the recorded layout's; for a fused Q/K/V with none recorded (open_clip's
        in_proj, GPT-2's c_attn, timm's qkv), equal thirds when ``n_rows`` divides by 3; else None
        (not fused, or a layout that cannot be split without the config)."""
        if self.fused is not None:
            return self.fused.spans(n_rows)
        if self.role == Role.attn_qkv:
            return FusedLayout(("q", "k", "v")).spans(n_rows)
        return None


# GPT-2 style Conv1D weights: transformer.h.N.{attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj}.weight
_GPT2_CONV1D = re.compile(r"(^|\.)h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj|crossattention\.(c_attn|q_attn|c_proj))\.weight$")
# Raw parameters applied as x @ W, so stored (in, out): Gemma 3's multimodal projector.
_STORED_IN_OUT = re.compile(r"(^|\.)mm_input_projection_weight$")

# Ordered: the first matching rule wins. Each regex is searched in the full key.
_MATRIX_RULES: list[tuple[Role, re.Pattern]] = [
    (Role.text_projection, re.compile(r"(^|\.)text_projection($|\.)")),
    (Role.position_embedding, re.compile(r"(positional_embedding|position_embeddings?|(^|\.)wpe\.|embed_positions|relative_attention_bias)")),
    (Role.embedding, re.compile(r"(token_embedding|word_embeddings|embed_tokens|(^|\.)wte\.|token_type_embeddings|(^|\.)shared\.weight$|(^|\.)embed_in\.)")),
    (Role.lm_head, re.compile(r"(^|\.)(lm_head|embed_out)(\.|$)|cls\.predictions\.decoder")),
    # MoE routers (Mixtral's block_sparse_moe.gate, Qwen-MoE's mlp.gate and shared_expert_gate) and
    # Gemma 3's multimodal projector: plain matrices, named here so that they are not "generic".
    (Role.matrix, re.compile(r"((^|\.)(block_sparse_moe|mlp)\.gate\.weight$|(^|\.)shared_expert_gate\.weight$|(^|\.)mm_input_projection_weight$)")),
    (Role.attn_qkv, re.compile(r"(in_proj_weight$|\.c_attn\.|query_key_value|qkv_proj|\.Wqkv\.|attn\.qkv\.)")),
    (Role.attn_q, re.compile(r"(\.q_proj\.|\.query\.|(Attention|attn|attention)\.q\.)")),
    (Role.attn_k, re.compile(r"(\.k_proj\.|\.key\.|(Attention|attn|attention)\.k\.)")),
    (Role.attn_v, re.compile(r"(\.v_proj\.|\.value\.|(Attention|attn|attention)\.v\.)")),
    (Role.attn_out, re.compile(r"(out_proj|\.o_proj\.|attention\.output\.dense|attn\.c_proj|(Attention|attn|attention)\.o\.|attn\.proj\.|self_attn\.dense\.|(^|\.)(self_)?attention\.dense\.)")),
    # SwiGLU w1/w3/w2 (Mixtral's experts, Meta's Llama format): w1 gate, w3 up, w2 down.
    (Role.mlp_gate, re.compile(r"(gate_proj|\.wi_0\.|\.w1\.)")),
    (Role.mlp_up, re.compile(r"(\.c_fc\.|\.fc1\.|up_proj|intermediate\.dense|\.wi\.|\.wi_1\.|dense_h_to_4h|mlp\.lin1\.|\.w3\.)")),
    (Role.mlp_down, re.compile(r"(mlp\.c_proj|\.fc2\.|down_proj|(^|\.)output\.dense|\.wo\.|dense_4h_to_h|\.w2\.|mlp\.lin2\.)")),
]
_NORM = re.compile(r"(^|\.|_)(ln|norm|layernorm|layer_norm|LayerNorm|ln_\w+|\w*_norm|\w*norm\d*)(\.|$|_)", re.IGNORECASE)
# Known tensors that are neither matrices, biases nor norms: rotary inv_freq and GPT-NeoX's
# attention mask buffers (older checkpoints), conv patch embeddings (ViT/SigLIP).
_KNOWN_OTHER = re.compile(r"((^|\.)rotary_emb\.inv_freq$|(^|\.)attention\.(bias|masked_bias)$|(^|\.)patch_embed(ding)?\.weight$)")

# Fused weights whose row layout is recorded.
_PHI3_GATE_UP = re.compile(r"(^|\.)gate_up_proj\.weight$")
_QKV_PROJ = re.compile(r"(^|\.)qkv_proj\.weight$")
_QUERY_KEY_VALUE = re.compile(r"(^|\.)query_key_value\.weight$")
_NEOX_QKV = re.compile(r"(^|\.)attention\.query_key_value\.weight$")  # GPT-NeoX; Bloom/Falcon/ChatGLM use self_attention.
_PER_HEAD_QKV_MODELS = frozenset({"gpt_neox"})  # config model_type whose query_key_value is [q_h; k_h; v_h] per head


def _get(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _config_value(config: Any, name: str) -> Any:
    """``name`` from a model config (a config.json mapping or a transformers config object), looked
    up at the top level and then in ``text_config`` (multimodal checkpoints such as Gemma 3's)."""
    for c in (config, _get(config, "text_config")):
        value = _get(c, name)
        if value is not None:
            return value
    return None


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _fused_layout(key: str, role: Role, shape: tuple[int, ...], transposed: bool, config: Any) -> FusedLayout | None:
    n_out, n_in = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
    if role == Role.mlp_up and _PHI3_GATE_UP.search(key):
        # Phi-3: gate, up = gate_up_proj(x).chunk(2, dim=-1): rows [0, I) gate, [I, 2I) up
        return FusedLayout(("gate", "up"))
    if role != Role.attn_qkv:
        return None
    if _QKV_PROJ.search(key):
        # Phi-3: q = qkv[..., :H·d], k = qkv[..., H·d : H·d + KV·d], v = the rest (grouped-query K/V)
        heads = _positive_int(_config_value(config, "num_attention_heads"))
        if heads is not None:
            kv = _positive_int(_config_value(config, "num_key_value_heads")) or heads
            hidden = _positive_int(_config_value(config, "hidden_size"))
            head_dim = _positive_int(_config_value(config, "head_dim")) or (hidden // heads if hidden else None)
            if head_dim and (heads + 2 * kv) * head_dim == n_out:
                return FusedLayout(("q", "k", "v"), (heads * head_dim, kv * head_dim, kv * head_dim))
        # Without a config: Q has as many rows as the input (H·d = hidden in Phi-3), K and V share the rest.
        rest = n_out - n_in
        if rest > 0 and rest % 2 == 0:
            return FusedLayout(("q", "k", "v"), (n_in, rest // 2, rest // 2))
        return FusedLayout(("q", "k", "v"), groups=None)
    if _QUERY_KEY_VALUE.search(key):
        model_type = _config_value(config, "model_type")
        if _NEOX_QKV.search(key) or model_type in _PER_HEAD_QKV_MODELS:
            # GPT-NeoX: qkv.view(..., H, 3·d).chunk(3, dim=-1): rows [q_h; k_h; v_h] for each head h
            heads = _positive_int(_config_value(config, "num_attention_heads"))
            if heads is not None and n_out % (3 * heads) == 0:
                return FusedLayout(("q", "k", "v"), groups=heads)
        # Unknown head count, or another family's query_key_value (Bloom: per head, Falcon: per
        # KV group, ChatGLM: concatenated): not equal thirds, and not known without the config.
        return FusedLayout(("q", "k", "v"), groups=None)
    return None


def infer_role(key: str, shape: tuple[int, ...], config: Any = None) -> RoleInfo:
    """Infer the role of one tensor from its key and shape (see module docstring). ``config``, the
    model's config (config.json as a mapping, or a transformers config), settles what the name
    cannot: the Q/K/V row layout of Phi-3's qkv_proj and GPT-NeoX's query_key_value."""
    shape = tuple(shape)
    if len(shape) == 2:
        for role, pattern in _MATRIX_RULES:
            if pattern.search(key):
                transposed = bool(_GPT2_CONV1D.search(key) or _STORED_IN_OUT.search(key))
                return RoleInfo(role, transposed=transposed, fused=_fused_layout(key, role, shape, transposed, config))
        return RoleInfo(Role.matrix, source=SOURCE_GENERIC)
    if len(shape) == 1:
        if key.endswith("bias"):
            return RoleInfo(Role.bias)
        if _NORM.search(key):
            return RoleInfo(Role.norm)
    if _KNOWN_OTHER.search(key):
        return RoleInfo(Role.other)
    return RoleInfo(Role.other, source=SOURCE_GENERIC)


@dataclass(frozen=True)
class RoleOverride:
    pattern: str  # fnmatch glob over the full key
    role: Role
    transposed: bool | None = None

    def matches(self, key: str) -> bool:
        return fnmatch.fnmatchcase(key, self.pattern)


def resolve_role(key: str, shape: tuple[int, ...], overrides: list[RoleOverride], config: Any = None) -> RoleInfo:
    """The role of ``key``: the first matching override, else the inferred role. An override that
    keeps the inferred role keeps its fused layout; one that changes the role drops it."""
    inferred = infer_role(key, shape, config)
    for o in overrides:
        if o.matches(key):
            transposed = inferred.transposed if o.transposed is None else o.transposed
            fused = inferred.fused if o.role == inferred.role and transposed == inferred.transposed else None
            return RoleInfo(o.role, transposed=transposed, source=o.pattern, fused=fused)
    return inferred

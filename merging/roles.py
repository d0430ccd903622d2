"""Layer roles inferred from tensor key names.

Roles decide how a tensor is merged: which tensors the SVD methods treat as matrices, which
layers ESM decomposes along activation shifts, which Subspace Boosting lifts (and with which
β), and which weights are stored transposed (GPT-2's Conv1D keeps (in, out)). A spec can
override any inference with glob patterns; the manifest records the role every tensor got.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from enum import Enum


class Role(str, Enum):
    embedding = "embedding"  # token / word embeddings (vocabulary tables)
    position_embedding = "position_embedding"
    lm_head = "lm_head"
    text_projection = "text_projection"  # open_clip text projection: excluded from SVD merging (ALGORITHMS §0)
    attn_qkv = "attn_qkv"  # fused Q/K/V
    attn_q = "attn_q"
    attn_k = "attn_k"
    attn_v = "attn_v"
    attn_out = "attn_out"
    mlp_up = "mlp_up"
    mlp_gate = "mlp_gate"
    mlp_down = "mlp_down"
    matrix = "matrix"  # any other 2-D weight (projections, poolers, classifier weights)
    norm = "norm"
    bias = "bias"
    other = "other"  # scalars, conv kernels, class tokens, buffers


ATTENTION_ROLES = frozenset({Role.attn_qkv, Role.attn_q, Role.attn_k, Role.attn_v, Role.attn_out})
LINEAR_ROLES = ATTENTION_ROLES | {Role.mlp_up, Role.mlp_gate, Role.mlp_down}
# 2-D tensors that the SVD methods merge by the arithmetic mean instead of as matrices:
# open_clip's text_projection (official code) and vocabulary tables / LM heads (the LLM ports).
NON_MATRIX_2D_ROLES = frozenset({Role.embedding, Role.lm_head, Role.text_projection})


@dataclass(frozen=True)
class RoleInfo:
    role: Role
    transposed: bool = False  # stored as (in, out); methods see it as (out, in)
    source: str = "inferred"  # "inferred" or the override pattern that set it

    def to_json(self) -> dict:
        return {"role": self.role.value, "transposed": self.transposed, "source": self.source}


# GPT-2 style Conv1D weights: transformer.h.N.{attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj}.weight
_GPT2_CONV1D = re.compile(r"(^|\.)h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj|crossattention\.(c_attn|q_attn|c_proj))\.weight$")

# Ordered: the first matching rule wins. Each regex is searched in the full key.
_MATRIX_RULES: list[tuple[Role, re.Pattern]] = [
    (Role.text_projection, re.compile(r"(^|\.)text_projection($|\.)")),
    (Role.position_embedding, re.compile(r"(positional_embedding|position_embeddings?|(^|\.)wpe\.|embed_positions|relative_attention_bias)")),
    (Role.embedding, re.compile(r"(token_embedding|word_embeddings|embed_tokens|(^|\.)wte\.|token_type_embeddings|(^|\.)shared\.weight$|(^|\.)embed_in\.)")),
    (Role.lm_head, re.compile(r"(^|\.)(lm_head|embed_out)(\.|$)|cls\.predictions\.decoder")),
    (Role.attn_qkv, re.compile(r"(in_proj_weight$|\.c_attn\.|query_key_value|qkv_proj|\.Wqkv\.|attn\.qkv\.)")),
    (Role.attn_q, re.compile(r"(\.q_proj\.|\.query\.|(Attention|attn|attention)\.q\.)")),
    (Role.attn_k, re.compile(r"(\.k_proj\.|\.key\.|(Attention|attn|attention)\.k\.)")),
    (Role.attn_v, re.compile(r"(\.v_proj\.|\.value\.|(Attention|attn|attention)\.v\.)")),
    (Role.attn_out, re.compile(r"(out_proj|\.o_proj\.|attention\.output\.dense|attn\.c_proj|(Attention|attn|attention)\.o\.|attn\.proj\.|self_attn\.dense\.)")),
    (Role.mlp_gate, re.compile(r"(gate_proj|\.wi_0\.|\.w1\.|\.w3\.)")),
    (Role.mlp_up, re.compile(r"(\.c_fc\.|\.fc1\.|up_proj|intermediate\.dense|\.wi\.|\.wi_1\.|dense_h_to_4h|mlp\.lin1\.)")),
    (Role.mlp_down, re.compile(r"(mlp\.c_proj|\.fc2\.|down_proj|(^|\.)output\.dense|\.wo\.|dense_4h_to_h|\.w2\.|mlp\.lin2\.)")),
]
_NORM = re.compile(r"(^|\.|_)(ln|norm|layernorm|layer_norm|LayerNorm|ln_\w+|\w*_norm|\w*norm\d*)(\.|$|_)", re.IGNORECASE)


def infer_role(key: str, shape: tuple[int, ...]) -> RoleInfo:
    """Infer the role of one tensor from its key and shape (see module docstring)."""
    if len(shape) == 2:
        for role, pattern in _MATRIX_RULES:
            if pattern.search(key):
                return RoleInfo(role, transposed=bool(_GPT2_CONV1D.search(key)))
        return RoleInfo(Role.matrix)
    if len(shape) == 1:
        if key.endswith("bias"):
            return RoleInfo(Role.bias)
        if _NORM.search(key):
            return RoleInfo(Role.norm)
    return RoleInfo(Role.other)


@dataclass(frozen=True)
class RoleOverride:
    pattern: str  # fnmatch glob over the full key
    role: Role
    transposed: bool | None = None

    def matches(self, key: str) -> bool:
        return fnmatch.fnmatchcase(key, self.pattern)


def resolve_role(key: str, shape: tuple[int, ...], overrides: list[RoleOverride]) -> RoleInfo:
    """The role of ``key``: the first matching override, else the inferred role."""
    inferred = infer_role(key, shape)
    for o in overrides:
        if o.matches(key):
            transposed = inferred.transposed if o.transposed is None else o.transposed
            return RoleInfo(o.role, transposed=transposed, source=o.pattern)
    return inferred

"""Subspace Boosting (Skorobogat et al., arXiv 2506.16506), ALGORITHMS.md §3.

A post-processing of the merged task vector of the sum-type methods (TA, TIES, Consensus),
applied before α: every singular value below the one at the cut-off index is raised to it,
which stops the rank collapse of merged task matrices.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from merging.linalg import svd
from merging.roles import LINEAR_ROLES, Role, RoleInfo

QKV_ROLES = frozenset({Role.attn_qkv, Role.attn_q, Role.attn_k, Role.attn_v})
BOOSTED_ROLES = LINEAR_ROLES | {Role.matrix}


class SubspaceBoostingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.01, gt=0, le=1, description="Cut-off: first index whose cumulative singular-value share reaches β.")
    attention_beta: float = Field(0.10, gt=0, le=1, description="β for attention Q/K/V weights.")
    mode: Literal["cumsum", "index"] = Field(
        "cumsum", description="'cumsum': cut-off by cumulative share of ΣS (official default); 'index': c = int(β·len(S)).")
    split_qkv: bool = Field(True, description="Boost fused Q/K/V weights per Q, K and V block (FusionBench 'per_qkv').")


def boost_matrix(m: torch.Tensor, beta: float, mode: str = "cumsum") -> torch.Tensor:
    """Clamp the spectrum of ``m`` from below at S[c] (§3.1)."""
    u, s, vh = svd(m)
    if mode == "index":
        c = min(int(beta * s.numel()), s.numel() - 1)
    else:
        total = s.sum()
        ratio = torch.cumsum(s, 0) / total
        hits = torch.nonzero(ratio >= beta)
        # No hit only when ΣS is 0 or NaN: fall back to the last index, as the 3f031f3 port does.
        c = int(hits[0]) if hits.numel() else s.numel() - 1
    s2 = torch.clamp(s, min=s[c])
    return (u * s2) @ vh


def apply_subspace_boosting(merged: torch.Tensor, role: RoleInfo, params: SubspaceBoostingParams) -> torch.Tensor:
    """Boost one merged task matrix (oriented (out, in)) according to its role; other tensors pass through."""
    if merged.ndim != 2 or role.role not in BOOSTED_ROLES:
        return merged
    if role.role in QKV_ROLES:
        beta = params.attention_beta
        spans = role.part_spans(merged.shape[0]) if role.role == Role.attn_qkv and params.split_qkv else None
        if spans is not None:
            # Q, K and V each boosted as its own matrix: gathered by the fused layout's row spans
            # (equal thirds, Phi-3's sizes from the config, or GPT-NeoX's per-head blocks), and put back.
            out = merged.clone()
            for part in spans:
                rows = torch.cat([torch.arange(a, b, device=merged.device) for a, b in part])
                out[rows] = boost_matrix(merged[rows], beta, params.mode)
            return out
        return boost_matrix(merged, beta, params.mode)
    return boost_matrix(merged, params.beta, params.mode)

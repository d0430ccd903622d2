"""Iso-CTS, isotropic merging in common and task-specific subspaces (Marczak et al., ICML 2025),
ALGORITHMS.md §2.2.

Per matrix: the top-k directions of the task-vector sum (common space) plus, for each task, the
top-s directions of its residual outside the common space (projection on the output side);
both factor matrices are orthogonalised with the polar factor and the spectrum is set to the
mean of the kept singular values. Sizes use Python's round (half to even) like the official code.
"""
from __future__ import annotations

import torch
from pydantic import Field

from merging.alpha import ISO_GRID
from merging.linalg import polar, polar_times, polar_with_singular_values, top_singular
from merging.methods.base import MatrixMethod, TensorJob
from merging.methods.iso_c import IsoParams
from merging.registry import register


class IsoCTSParams(IsoParams):
    common_space_fraction: float = Field(0.8, gt=0, lt=1, description="Fraction of the rank given to the common space.")


def iso_cts_sizes(r: int, n_tasks: int, fraction: float) -> tuple[int, int]:
    """(common-space size k, per-task size s) as in the official code."""
    k0 = int(r * fraction)
    s = round((r - k0) / n_tasks)
    k = r - s * n_tasks
    if k < 0:  # only for tiny r with a small fraction: keep the sizes inside the rank
        s = r // n_tasks
        k = r - s * n_tasks
    return k, s


def iso_cts_matrix(taus: torch.Tensor, fraction: float) -> torch.Tensor:
    n_tasks, m, n = taus.shape
    k, s = iso_cts_sizes(min(m, n), n_tasks, fraction)
    total = taus.sum(0)
    if s == 0:  # exactly Iso-C
        p, sv = polar_with_singular_values(total)
        return sv.mean() * p
    u_c, s_c, v_c = top_singular(total, k)
    residual = taus - u_c @ (u_c.mT @ taus)  # batched projection on the output side
    ur, sr, vhr = top_singular(residual, s)
    u_cat = torch.cat([ur.permute(1, 0, 2).reshape(m, n_tasks * s), u_c], dim=1)
    v_cat = torch.cat([vhr.reshape(n_tasks * s, n), v_c], dim=0)
    s_cat = torch.cat([sr.reshape(-1), s_c])
    return s_cat.mean() * polar_times(u_cat, polar(v_cat))[0]


@register
class IsoCTS(MatrixMethod):
    name = "iso_cts"
    alpha_search = ISO_GRID
    summary = "Isotropic merging with common and task-specific subspaces."
    Params = IsoCTSParams

    def merge_matrix(self, job: TensorJob):
        return iso_cts_matrix(job.taus, self.params.common_space_fraction)

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
from merging.linalg import polar, polar_times, polar_with_singular_values, top_singular, top_singular_outside
from merging.methods.base import MatrixMethod, SarBasis, TensorJob, Truncation
from merging.methods.iso_c import IsoParams
from merging.methods.registry import register
from merging.roles import Role


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
    # the float64 regime keeps the official steps (LAPACK SVDs); so does a tall near-rank-k sum
    merged = None if taus.dtype == torch.float64 else _iso_cts_structured(taus, total, k, s)
    return _iso_cts_direct(taus, total, k, s) if merged is None else merged.to(taus.dtype)


def _iso_cts_direct(taus: torch.Tensor, total: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """The official steps as written: project, factor each residual, orthogonalise both whole
    concatenations (the float64 regime, and the fallback of the structured route)."""
    n_tasks, m, n = taus.shape
    u_c, s_c, v_c = top_singular(total, k)
    residual = taus - u_c @ (u_c.mT @ taus)  # batched projection on the output side
    ur, sr, vhr = top_singular(residual, s)
    u_cat = torch.cat([ur.permute(1, 0, 2).reshape(m, n_tasks * s), u_c], dim=1)
    v_cat = torch.cat([vhr.reshape(n_tasks * s, n), v_c], dim=0)
    s_cat = torch.cat([sr.reshape(-1), s_c])
    return s_cat.mean() * polar_times(u_cat, polar(v_cat))[0]


def _iso_cts_structured(taus: torch.Tensor, total: torch.Tensor, k: int, s: int) -> torch.Tensor | None:
    """The same result, using that every residual R_t = (I − U_c U_cᵀ) Δ_t has its column space
    outside the common space: the left factor [U_1 … U_T  U_c] is block-orthogonal, so its polar
    factor is [polar([U_1 … U_T])  U_c] and only the (m × sT) task block needs orthogonalising.

    * wide or square layers (m ≤ n, r = m): the sum's full left basis is known, and its last
      m − k = sT columns C span the complement, so R_t = C (Cᵀ Δ_t): each task's top-s SVD is that
      of an sT × n matrix, and polar([U_t]) = C · polar(Z) for the sT × sT coefficients Z;
    * tall layers (m > n): each R_t's top-s from the n × n Gram RᵀR = ΔᵀΔ − WᵀW, W = U_cᵀΔ
      (``top_singular_outside``), without forming R.

    Float64 throughout but the last product of two orthonormal factors (the official code
    projects and factors in float32), and more accurate than the direct route in float32. On the
    12-block ViT-B/16 benchmark with 8 experts it took one thread's CPU time from 115 to 93 s and
    the merge from 45.6 to 34 s (bench/RESULTS.md).
    Returns None when the sum's rank is below k on a tall layer (then U_c is not orthonormal).
    """
    n_tasks, m, n = taus.shape
    if m <= n:
        # factor the transpose: the left basis is then the Gram's eigenbasis itself, orthonormal to
        # rounding even where singular values vanish (a recovered x v / σ would not be)
        v_t, sv, u_t = top_singular(total.mT, m, dtype=torch.float64)
        u, vh = u_t.mT, v_t.mT
        u_c, s_c, v_c = u[:, :k], sv[:k], vh[:k]
        comp = u[:, k:]  # (m, sT)
        parts = [top_singular(comp.mT @ taus[t].to(torch.float64), s, exact=False) for t in range(n_tasks)]
        z = torch.cat([p[0] for p in parts], dim=1)  # (sT, sT): the task directions in C's coordinates
        p_tasks = comp @ polar_with_singular_values(z, exact=False)[0]
    else:
        u_c, s_c, v_c = top_singular(total, k, dtype=torch.float64)
        # x v / σ loses orthogonality as (σ₁/σ)²·eps: near rank k the recovered U_c is not a basis
        if not s_c[-1] > 1e-4 * s_c[0]:
            return None
        parts = [top_singular_outside(taus[t], u_c, s) for t in range(n_tasks)]
        p_tasks = polar_with_singular_values(torch.cat([p[0] for p in parts], dim=1), exact=False)[0]
    s_cat = torch.cat([*(p[1] for p in parts), s_c])
    v_cat = torch.cat([*(p[2] for p in parts), v_c], dim=0)
    p_v = polar_with_singular_values(v_cat, exact=False)[0]
    # Both factors are orthonormal (condition number 1), so their m-row product loses nothing
    # beyond the output's own float32 rounding when taken in the tensor's dtype (3× faster at 3072 × 768²).
    left = torch.cat([p_tasks, u_c], dim=1).to(taus.dtype)
    return s_cat.mean().to(taus.dtype) * (left @ p_v.to(taus.dtype))


@register
class IsoCTS(MatrixMethod):
    name = "iso_cts"
    alpha_search = ISO_GRID
    summary = "Isotropic merging with common and task-specific subspaces."
    Params = IsoCTSParams
    orthogonalises = True

    def merge_matrix(self, job: TensorJob):
        return iso_cts_matrix(job.taus, self.params.common_space_fraction)

    @classmethod
    def truncation(cls, params: IsoCTSParams, shape: tuple[int, int], n_tasks: int, role: Role | None) -> Truncation:
        k, s = iso_cts_sizes(min(shape), n_tasks, params.common_space_fraction)
        return Truncation(s, "iso_cts: s per task + k common (round half to even)", common=k, residual=s)

    @classmethod
    def sar_basis(cls, params: IsoCTSParams, role: Role | None) -> SarBasis:
        return "task_sum"  # a flat spectrum; the task sum's U is a proxy (its common space is part of the merge)

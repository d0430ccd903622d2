"""Iso-C, isotropic merging in the common space (Marczak et al., ICML 2025), ALGORITHMS.md §2.1.

Per matrix: M = Σ_t τ_t; replace its spectrum by the mean singular value: σ̄ · U Vh, where
U Vh is the polar factor of M. Other tensors: mean of task vectors.
"""
from __future__ import annotations

from pydantic import Field

from merging.alpha import ISO_GRID
from merging.linalg import polar_with_singular_values
from merging.methods.base import MatrixMethod, MethodParams, SarBasis, TensorJob, Truncation
from merging.methods.registry import register
from merging.roles import Role


class IsoParams(MethodParams):
    alpha: float = Field(1.0, ge=-10, le=10, allow_inf_nan=False, description="Scaling (FusionBench default 1.0; official code searches 0.1..3.0).")


@register
class IsoC(MatrixMethod):
    name = "iso_c"
    alpha_search = ISO_GRID
    summary = "Isotropic merging: flatten the spectrum of the task-vector sum to its mean singular value."
    Params = IsoParams
    orthogonalises = True

    def merge_matrix(self, job: TensorJob):
        p, s = polar_with_singular_values(job.taus.sum(0))
        return s.mean() * p

    @classmethod
    def truncation(cls, params: IsoParams, shape: tuple[int, int], n_tasks: int, role: Role | None) -> Truncation:
        r = min(shape)  # nothing is cut: the whole common space of the sum, its spectrum flattened
        return Truncation(r, "iso_c: full rank", common=r)

    @classmethod
    def sar_basis(cls, params: IsoParams, role: Role | None) -> SarBasis:
        return "task_sum"  # a flat spectrum: fig_3a.py orders the directions by the task sum, whose U the merge keeps

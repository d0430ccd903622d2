"""What the sum-type methods that accept Subspace Boosting share (Task Arithmetic, TIES,
Consensus): the parameter, its application to a merged task matrix (ALGORITHMS.md §3), α's grid,
and what boosting changes for the diagnostics."""
from __future__ import annotations

import torch
from pydantic import Field

from merging.alpha import SUM_GRID
from merging.methods.base import MergeMethod, MethodParams, SarBasis, TensorJob
from merging.methods.subspace_boosting import SubspaceBoostingParams, apply_subspace_boosting
from merging.roles import Role, RoleInfo, is_matrix


class SumMethodParams(MethodParams):
    """Parameters shared by the sum-type methods, which accept Subspace Boosting."""
    subspace_boosting: SubspaceBoostingParams | None = Field(
        None, description="Lift the small singular values of each merged task matrix (ALGORITHMS.md §3); off by default.")


def boost(merged: torch.Tensor, job: TensorJob, params: SumMethodParams) -> torch.Tensor:
    """Apply Subspace Boosting to a sum-type merge result when it is configured."""
    if params.subspace_boosting is None or not job.is_matrix:
        return merged
    return apply_subspace_boosting(merged, job.role, params.subspace_boosting)


class SumMethod(MergeMethod):
    """Base of the sum-type methods with optional Subspace Boosting (not a method itself)."""
    Params = SumMethodParams
    alpha_search = SUM_GRID

    def row_blockable(self, role: RoleInfo, shape: tuple[int, ...]) -> bool:
        # element-wise, except that Subspace Boosting takes the SVD of each merged matrix
        return self.params.subspace_boosting is None or not is_matrix(role, shape)

    @classmethod
    def sar_basis(cls, params: SumMethodParams, role: Role | None) -> SarBasis:
        # With its default β, boosting raises every singular value to σ_1: the merged matrix's
        # directions are unordered, so SAR orders them by the task sum (as fig_3a.py does for Iso).
        return "task_sum" if params.subspace_boosting is not None else "merged"

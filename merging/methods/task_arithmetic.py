"""Task Arithmetic (Ilharco et al., 2023): θ = θ0 + α · Σ_t τ_t, optionally with Subspace Boosting."""
from __future__ import annotations

from pydantic import Field

from merging.alpha import SUM_GRID
from merging.methods.base import MergeMethod, MethodParams, TensorJob
from merging.methods.subspace_boosting import SubspaceBoostingParams, apply_subspace_boosting
from merging.registry import register


class SumMethodParams(MethodParams):
    """Parameters shared by the sum-type methods, which accept Subspace Boosting."""
    subspace_boosting: SubspaceBoostingParams | None = Field(
        None, description="Lift the small singular values of each merged task matrix (ALGORITHMS.md §3); off by default.")


class TaskArithmeticParams(SumMethodParams):
    alpha: float = Field(0.3, ge=-10, le=10, allow_inf_nan=False, description="Scaling of the task-vector sum (FusionBench default 0.3).")


def boost(merged, job: TensorJob, params: SumMethodParams):
    """Apply Subspace Boosting to a sum-type merge result when it is configured."""
    if params.subspace_boosting is None or not job.is_matrix:
        return merged
    return apply_subspace_boosting(merged, job.role, params.subspace_boosting)


@register
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    alpha_search = SUM_GRID
    summary = "Sum of task vectors scaled by α (Ilharco et al. 2023); optional Subspace Boosting."
    Params = TaskArithmeticParams

    def merge(self, job: TensorJob):
        return boost(job.taus.sum(0), job, self.params)

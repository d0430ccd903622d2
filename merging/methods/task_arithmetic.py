"""Task Arithmetic (Ilharco et al., 2023): θ = θ0 + α · Σ_t τ_t, optionally with Subspace Boosting."""
from __future__ import annotations

from pydantic import Field

from merging.methods.base import TensorJob
from merging.methods.registry import register
from merging.methods.sum_type import SumMethod, SumMethodParams, boost


class TaskArithmeticParams(SumMethodParams):
    alpha: float = Field(0.3, ge=-10, le=10, allow_inf_nan=False, description="Scaling of the task-vector sum (FusionBench default 0.3).")


@register
class TaskArithmetic(SumMethod):
    name = "task_arithmetic"
    summary = "Sum of task vectors scaled by α (Ilharco et al. 2023); optional Subspace Boosting."
    Params = TaskArithmeticParams
    working_copies = 0.0  # the sum is one row block

    def merge(self, job: TensorJob):
        return boost(job.taus.sum(0), job, self.params)

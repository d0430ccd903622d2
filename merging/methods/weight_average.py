"""Weight averaging (model soup): θ = θ0 + α · mean_t τ_t; with α = 1 this is mean_t θ_t."""
from __future__ import annotations

from merging.methods.base import MergeMethod, TensorJob
from merging.methods.registry import register
from merging.roles import RoleInfo


@register
class WeightAverage(MergeMethod):
    name = "weight_average"
    summary = "Mean of the experts' weights (α = 1), i.e. θ0 + α·mean(τ)."

    working_copies = 0.0  # the mean is one row block

    def row_blockable(self, role: RoleInfo, shape: tuple[int, ...]) -> bool:
        return True

    def merge(self, job: TensorJob):
        return job.taus.mean(0)

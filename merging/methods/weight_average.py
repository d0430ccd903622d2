"""Weight averaging (model soup): θ = θ0 + α · mean_t τ_t; with α = 1 this is mean_t θ_t."""
from __future__ import annotations

from merging.methods.base import MergeMethod, TensorJob
from merging.methods.registry import register


@register
class WeightAverage(MergeMethod):
    name = "weight_average"
    summary = "Mean of the experts' weights (α = 1), i.e. θ0 + α·mean(τ)."

    def merge(self, job: TensorJob):
        return job.taus.mean(0)

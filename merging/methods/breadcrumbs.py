"""Model Breadcrumbs (Davari & Belilovsky, 2024): per tensor and expert, drop the largest-|τ|
fraction γ (outliers) and the smallest entries so that ``density`` remains, then add the task
vectors. Counts follow mergekit: n_top = int(γN), n_bottom = N − int(density·N) − n_top."""
from __future__ import annotations

import torch
from pydantic import Field, model_validator

from merging.alpha import SUM_GRID
from merging.methods.base import MergeMethod, MethodParams, TensorJob
from merging.methods.registry import register


class BreadcrumbsParams(MethodParams):
    alpha: float = Field(0.3, ge=-10, le=10, allow_inf_nan=False, description="Scaling of the sum.")
    density: float = Field(0.9, gt=0, le=1, description="Fraction of entries kept per tensor.")
    gamma: float = Field(0.01, ge=0, lt=1, description="Fraction of largest-magnitude entries removed per tensor.")

    @model_validator(mode="after")
    def _fits(self):
        if self.gamma >= self.density:
            raise ValueError("gamma must be smaller than density")
        return self


@register
class Breadcrumbs(MergeMethod):
    name = "breadcrumbs"
    alpha_search = SUM_GRID
    summary = "Drop each task vector's largest (γ) and smallest entries, keeping `density`; then Task Arithmetic."
    Params = BreadcrumbsParams
    # the int64 sort order and ranks (two float32-sized arrays each), |τ| and the mask: it ranks every
    # entry of a tensor, so it is never cut into row blocks (MergeMethod.row_blockable)
    working_copies = 5.5

    def merge(self, job: TensorJob):
        flat = job.taus.reshape(job.taus.shape[0], -1)
        n = flat.shape[1]
        n_top = int(self.params.gamma * n)
        n_bottom = max(n - int(self.params.density * n) - n_top, 0)
        order = torch.argsort(flat.abs(), dim=1, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(n, device=flat.device).expand_as(order))
        keep = (rank >= n_bottom) & (rank < n - n_top)
        return (flat * keep).sum(0).reshape(job.taus.shape[1:])

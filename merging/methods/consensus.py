"""Consensus Task Arithmetic with TALL masks (Wang et al., ICML 2024), ALGORITHMS.md §5.

Per task t: m_t = |τ_t| > λ_t · |Σ_s τ_s − τ_t| (the official |θ0 − θ_t| > λ_t |θ_MTL − θ_t| with
θ_MTL = θ0 + Σ_s τ_s). Entries kept by at least k masks form the consensus mask c, and the
result is (Σ_t τ_t) ⊙ c. ``"lambda": "auto"`` is the official per-task λ search (the TALL-mask step),
run by the evaluation pipeline before the merge (``workers.pipeline.Pipeline.choose_tall_lambdas``).
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from merging.methods.base import TensorJob
from merging.methods.registry import register
from merging.methods.sum_type import SumMethod, SumMethodParams, boost


class ConsensusParams(SumMethodParams):
    model_config = {"extra": "forbid", "populate_by_name": True}
    alpha: float = Field(0.3, ge=-10, le=10, allow_inf_nan=False, description="Scaling of the masked sum.")
    lambda_: float | list[float] | Literal["auto"] = Field(
        0.6, alias="lambda",
        description="TALL-mask λ: one number, one per expert, or 'auto': each expert's λ from {0.2 … 0.6} chosen on "
                    "its task's validation split, as the official code does (needs an evaluation section; FusionBench: 0.6).")
    k: int = Field(2, ge=0, description="Minimum number of task masks that must keep an entry.")

    def lambdas(self, n: int) -> list[float]:
        if self.lambda_ == "auto":  # the pipeline replaces it before the merge (MergeSpec.searched_params)
            raise ValueError("params.lambda: 'auto' must be resolved on validation data before merging")
        return [float(self.lambda_)] * n if isinstance(self.lambda_, (int, float)) else list(self.lambda_)


@register
class Consensus(SumMethod):
    name = "consensus"
    summary = "Task Arithmetic restricted to entries that at least k TALL masks keep; optional Subspace Boosting."
    Params = ConsensusParams
    validation_searched = ("lambda",)
    working_copies = 3.0  # |τ|, the leave-one-out sums and their |·|, the masks

    @classmethod
    def check_experts(cls, params: ConsensusParams, n: int) -> str | None:
        if params.lambda_ == "auto":
            return None if params.k <= n else f"params.k: must be at most the number of experts ({n}), got {params.k}"
        if isinstance(params.lambda_, list) and len(params.lambda_) != n:
            return f"params.lambda: expected one value per expert ({n}), got {len(params.lambda_)}"
        if any(not (0 <= x <= 100) for x in params.lambdas(n)):
            return "params.lambda: values must be between 0 and 100"
        if params.k > n:
            return f"params.k: must be at most the number of experts ({n}), got {params.k}"
        return None

    def merge(self, job: TensorJob):
        taus = job.taus
        total = taus.sum(0)
        lam = torch.tensor(self.params.lambdas(taus.shape[0]), dtype=taus.dtype, device=taus.device)
        lam = lam.reshape(-1, *([1] * (taus.ndim - 1)))
        masks = taus.abs() > lam * (total.unsqueeze(0) - taus).abs()
        consensus = masks.sum(0) >= self.params.k
        return boost(total * consensus, job, self.params)

"""DARE (Yu et al., 2024): randomly drop a fraction p of each task vector's entries, rescale by
1/(1−p), then add the task vectors (Task Arithmetic). Seeded per (seed, key, expert), so the
result does not depend on the order or device the keys are processed on."""
from __future__ import annotations

import hashlib

import torch
from pydantic import Field

from merging.alpha import SUM_GRID
from merging.methods.base import MergeMethod, MethodParams, TensorJob
from merging.methods.registry import register


class DareParams(MethodParams):
    alpha: float = Field(0.3, ge=-10, le=10, allow_inf_nan=False, description="Scaling of the sum (FusionBench default 0.3).")
    p: float = Field(0.5, ge=0, lt=1, description="Drop probability per entry (FusionBench sparsity_ratio 0.5).")
    rescale: bool = Field(True, description="Divide kept entries by 1−p.")
    seed: int = Field(0, ge=0, description="Seed of the drop masks.")


def key_seed(seed: int, key: str, index: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{key}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@register
class Dare(MergeMethod):
    name = "dare"
    alpha_search = SUM_GRID
    summary = "Drop-and-rescale each task vector at random (seeded), then Task Arithmetic."
    Params = DareParams

    def merge(self, job: TensorJob):
        p = self.params.p
        out = torch.zeros_like(job.taus[0])
        for t in range(job.taus.shape[0]):
            g = torch.Generator().manual_seed(key_seed(self.params.seed, job.key, t))
            keep = torch.rand(job.taus.shape[1:], generator=g) >= p  # drawn on CPU: identical on every device
            tau = job.taus[t] * keep.to(job.taus.device)
            out += tau / (1 - p) if self.params.rescale else tau
        return out

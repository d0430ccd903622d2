"""TIES-Merging (Yadav et al., 2023), exactly as the TSV/TALL/Iso official code (ALGORITHMS.md §5).

The trim threshold is global across all keys: the official code flattens every task vector
into one vector and takes ``kthvalue``. We never hold that vector. The threshold is found
exactly in two streaming passes over the float32 bit patterns of |τ| (for non-negative floats,
the bit pattern is monotone in the value): pass 0 histograms the high 16 bits, pass 1 the low
16 bits inside the bucket that holds the k-th value. Pass 2 counts the global majority sign
used where the elected sign is zero. The merge pass then trims, elects and merges per key.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from merging.methods.base import MergeContext, TensorJob
from merging.methods.registry import register
from merging.methods.sum_type import SumMethod, SumMethodParams, boost

_HI = 1 << 15  # non-negative float32: high half of the bit pattern is < 2^15 (sign bit clear)
_LO = 1 << 16


class TiesParams(SumMethodParams):
    alpha: float = Field(1.0, ge=-10, le=10, allow_inf_nan=False,
                         description="Scaling of the merged task vector (1.0 for merge_func='mean', as in the TIES paper).")
    k: float = Field(20, gt=0, le=100, description="Percent of entries kept per task (global magnitude threshold across all layers).")
    merge_func: Literal["mean", "sum"] = Field("mean", description="Disjoint mean (official TSV/TALL/Iso code) or disjoint sum.")


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.abs().to(torch.float32).view(torch.int32).reshape(x.shape[0], -1).to(torch.int64)


@register
class Ties(SumMethod):
    name = "ties"
    summary = "Trim to the top-k% magnitudes (global threshold), elect signs by mass, disjoint mean or sum."
    Params = TiesParams
    prepasses = 3
    working_copies = 5.0  # the pre-passes' |τ| and its bit patterns in int64 (two of them); the merge's trimmed copy and masks

    def __init__(self, params: TiesParams, ctx: MergeContext):
        super().__init__(params, ctx)
        t = ctx.n_experts
        self.count = 0  # D: entries per task vector, all keys
        dev = ctx.device  # histograms live where the task vectors are: no transfers per key
        self.hist_hi = torch.zeros(t, _HI, dtype=torch.int64, device=dev)
        self.hist_lo = torch.zeros(t, _LO, dtype=torch.int64, device=dev)
        self.bucket = torch.zeros(t, dtype=torch.int64, device=dev)
        self.rank_in_bucket = torch.zeros(t, dtype=torch.int64, device=dev)
        self.threshold: torch.Tensor | None = None  # (T,) float32, or None = keep all
        self.majority_sum = 0

    def _kk(self) -> int:
        # Official: k = d − int(d · K/100); thr = kthvalue(|τ|, k). K = 100 keeps everything.
        return self.count - int(self.count * (self.params.k / 100))

    def observe(self, pass_index: int, job: TensorJob) -> None:
        if pass_index == 0:
            self.count += job.taus[0].numel()
            hi = _bits(job.taus) >> 16
            for t in range(hi.shape[0]):
                self.hist_hi[t] += torch.bincount(hi[t], minlength=_HI)
        elif pass_index == 1:
            if self.threshold is not None:
                return
            bits = _bits(job.taus)
            for t in range(bits.shape[0]):
                sel = bits[t][(bits[t] >> 16) == self.bucket[t]]
                self.hist_lo[t] += torch.bincount(sel & 0xFFFF, minlength=_LO)
        else:
            sign = torch.sign(self._trim(job.taus).sum(0))
            self.majority_sum += sign.sum().to(torch.int64)  # stays on the device until end_pass

    def end_pass(self, pass_index: int) -> None:
        kk = self._kk()
        if pass_index == 0:
            if kk <= 0:
                self.threshold = None  # keep every entry
                return
            cum = torch.cumsum(self.hist_hi, 1)
            self.bucket = torch.searchsorted(cum, torch.full((cum.shape[0], 1), kk, device=cum.device)).squeeze(1)
            before = torch.where(self.bucket > 0, cum.gather(1, (self.bucket - 1).clamp_min(0)[:, None]).squeeze(1), 0)
            self.rank_in_bucket = kk - before
        elif pass_index == 1 and self.threshold is None and kk > 0:
            cum = torch.cumsum(self.hist_lo, 1)
            lo = torch.searchsorted(cum, self.rank_in_bucket[:, None]).squeeze(1)
            bits = ((self.bucket << 16) | lo).to(torch.int32)
            self.threshold = bits.view(torch.float32)
            self.hist_hi = self.hist_lo = None  # free
        elif pass_index == 2:
            total = int(self.majority_sum)
            self.majority = 1.0 if total > 0 else (-1.0 if total < 0 else 0.0)

    def _trim(self, taus: torch.Tensor) -> torch.Tensor:
        if self.threshold is None:
            return taus
        thr = self.threshold.to(taus.device).reshape(-1, *([1] * (taus.ndim - 1)))
        return taus * (taus.abs().to(torch.float32) >= thr)

    def merge(self, job: TensorJob):
        trimmed = self._trim(job.taus)
        sign = torch.sign(trimmed.sum(0))
        sign = torch.where(sign == 0, torch.full_like(sign, self.majority), sign)
        keep = torch.where(sign > 0, trimmed > 0, trimmed < 0)
        selected = trimmed * keep
        merged = selected.sum(0)
        if self.params.merge_func == "mean":
            merged = merged / (selected != 0).sum(0).clamp_min(1)
        return boost(merged, job, self.params)

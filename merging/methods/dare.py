"""DARE (Yu et al., 2024): randomly drop a fraction p of each task vector's entries, rescale by
1/(1−p), then add the task vectors (Task Arithmetic). Seeded per (seed, key, expert), so the
result does not depend on the order or device the keys are processed on, nor on row blocks."""
from __future__ import annotations

import hashlib

import torch
from pydantic import Field

from merging.alpha import SUM_GRID
from merging.methods.base import MergeContext, MergeMethod, MethodParams, RowBlock, TensorJob
from merging.methods.registry import register
from merging.roles import RoleInfo


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
    working_copies = 0.5  # the keep masks (bool) and one expert's masked rows at a time

    def __init__(self, params: DareParams, ctx: MergeContext):
        super().__init__(params, ctx)
        self._generators: dict[str, list[torch.Generator]] = {}  # key -> one per expert, while its row blocks are drawn

    def row_blockable(self, role: RoleInfo, shape: tuple[int, ...]) -> bool:
        # Masks are drawn in the merge's (out, in) order; a transposed key's stored rows are its columns.
        return not (role.transposed and len(shape) == 2)

    def draw(self, key: str, task_shape: tuple[int, ...], n_experts: int, block: RowBlock | None) -> torch.Tensor:
        """The keep masks of the job (T, *task_shape), drawn on CPU so every device gets the same
        ones. A key in row blocks continues one generator per expert from block to block: torch
        draws element by element, so the blocks' masks are exactly the whole key's."""
        if block is None or block.first:
            gens = [torch.Generator().manual_seed(key_seed(self.params.seed, key, t)) for t in range(n_experts)]
            if block is not None:
                self._generators[key] = gens
        else:
            gens = self._generators[key]
        if block is not None and block.last:
            del self._generators[key]
        return torch.stack([torch.rand(task_shape, generator=g) >= self.params.p for g in gens])

    def merge(self, job: TensorJob):
        p = self.params.p
        draws = job.draws if job.draws is not None else self.draw(job.key, tuple(job.taus.shape[1:]), job.taus.shape[0], job.block)
        keep = draws.to(job.taus.device)
        out = torch.zeros_like(job.taus[0])
        for t in range(job.taus.shape[0]):
            tau = job.taus[t] * keep[t]
            out += tau / (1 - p) if self.params.rescale else tau
        return out

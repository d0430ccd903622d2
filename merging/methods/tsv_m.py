"""TSV-M, Task Singular Vectors Merge (Gargiulo et al., CVPR 2025), ALGORITHMS.md §1.1.

Per matrix: keep each task's top k = int(r/T) singular triplets, concatenate, replace both
factor matrices by their polar factors, keep the singular values as they are.
Other tensors: mean of task vectors.
"""
from __future__ import annotations

import torch

from merging.alpha import SVD_GRID
from merging.linalg import polar, polar_times, top_singular
from merging.methods.base import MatrixMethod, MethodParams, TensorJob, Truncation
from merging.methods.registry import register
from merging.roles import Role


def tsvm_rank(m: int, n: int, n_tasks: int) -> int:
    return int(min(m, n) * (1 / n_tasks))


def tsv_merge_matrix(taus: torch.Tensor) -> torch.Tensor:
    """TSV-M of stacked task matrices ``taus`` (T, m, n)."""
    n_tasks, m, n = taus.shape
    k = tsvm_rank(m, n, n_tasks)
    if k == 0:  # r < T: the official code returns an all-zero matrix
        return torch.zeros((m, n), dtype=taus.dtype, device=taus.device)
    u, s, vh = top_singular(taus, k)  # batched over tasks
    u_cat = u.permute(1, 0, 2).reshape(m, n_tasks * k)
    s_cat = s.reshape(-1)
    v_cat = vh.reshape(n_tasks * k, n)
    # polar(U) diag(s) polar(V), with polar(U) applied to the small right factor
    return polar_times(u_cat, s_cat.unsqueeze(-1) * polar(v_cat))[0]


@register
class TSVM(MatrixMethod):
    name = "tsv_m"
    alpha_search = SVD_GRID
    summary = "Task Singular Vectors Merge: per-task top-(r/T) singular vectors, orthogonalised across tasks."
    Params = MethodParams
    orthogonalises = True

    def merge_matrix(self, job: TensorJob):
        return tsv_merge_matrix(job.taus)

    @classmethod
    def truncation(cls, params: MethodParams, shape: tuple[int, int], n_tasks: int, role: Role | None) -> Truncation:
        return Truncation(tsvm_rank(*shape, n_tasks), "tsv_m: int(r/T)")

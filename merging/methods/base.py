"""The interface every merge method implements.

The engine streams one tensor at a time. For each key it hands the method a ``TensorJob``
holding the T task vectors of that key (stacked, in the compute dtype, on the compute device,
matrices oriented (out, in)), and the method returns the merged task vector. The engine then
writes ``θ0 + coefficient · τ_merged``.

Methods that need statistics across keys (TIES's global trim threshold) declare
``prepasses``: the engine streams every key through ``observe`` that many times before the
merge pass. Methods whose final scale depends on other keys' merged results (ESM's
inter-layer scaling) return a group from ``rescale_group``; the engine spills those merged
tensors to disk, collects their norms, and applies ``group_factors`` at the end.

The data-free diagnostics (merging/diagnostics) name no method: what they need to know about one
(the rank it keeps of each task matrix, which basis orders its merged matrix's directions, whether
it orthogonalises) each method declares through the hooks at the end of ``MergeMethod``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from merging.alpha import AlphaSearch
from merging.calibration import CalibrationSet
from merging.roles import NON_MATRIX_2D_ROLES, Role, RoleInfo, is_matrix


class MethodParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(1.0, ge=-10, le=10, allow_inf_nan=False,
                         description="Scale of the merged task vector: θ = θ0 + α·τ_merged.")


@dataclass(frozen=True)
class RowBlock:
    """Rows ``[start, stop)`` of a key with ``rows`` rows (its first dimension, as stored)."""
    start: int
    stop: int
    rows: int

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.stop == self.rows


@dataclass
class TensorJob:
    key: str
    role: RoleInfo
    taus: torch.Tensor  # (T, *shape) task vectors θ_t − θ0
    index: int = 0  # position in the plan (used to derive per-key seeds and progress)
    # Set when the key is merged in row blocks (only for keys the method calls ``row_blockable``):
    # ``taus`` then holds those rows as stored (never transposed), and ``merge`` returns the same rows.
    block: RowBlock | None = None
    draws: Any = None  # what ``MergeMethod.draw`` returned for this job (DARE's masks)

    @property
    def is_matrix(self) -> bool:
        """The SVD methods' 2-D test (ALGORITHMS.md §0): 2-D and not a vocabulary/LM-head/text-projection table."""
        return self.taus.ndim == 3 and self.role.role not in NON_MATRIX_2D_ROLES


@dataclass(frozen=True)
class Truncation:
    """What a method keeps of each task matrix of one key, for the diagnostics' energy-kept figures."""
    per_task: int  # directions each task keeps
    rule: str  # how ``per_task`` follows from the shape, as the report states it
    # A subspace of the task sum, of this size, kept for every task (Iso-C/CTS): the energy kept
    # is then measured in it, plus ``residual`` directions of each task outside it.
    common: int | None = None
    residual: int = 0
    # Why the singular-value energy of the top ``per_task`` directions only bounds what is kept
    # (the method keeps other directions than the task matrix's singular vectors), or None.
    upper_bound: str | None = None

    def report(self, n_tasks: int) -> dict[str, Any]:
        """The ``truncation`` entry of an analysed layer in diagnostics.json."""
        return {"per_task": [self.per_task] * n_tasks, "common": self.common, "rule": self.rule}


SarBasis = Literal["merged", "task_sum"]


@dataclass
class MergeContext:
    expert_names: list[str]
    device: torch.device
    dtype: torch.dtype
    calibration: CalibrationSet | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # method-reported facts for the manifest

    @property
    def n_experts(self) -> int:
        return len(self.expert_names)


class MergeMethod:
    name: ClassVar[str]
    summary: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    prepasses: ClassVar[int] = 0
    needs_calibration: ClassVar[bool] = False
    # Whether the merge should run with every freed work array of 8 MB or more given back to the
    # system at once (merging/heap.py): for methods that allocate many large float64 temporaries
    # per tensor, where glibc's heap would otherwise hold several times what is in use.
    unmap_freed_arrays: ClassVar[bool] = False
    # How params.alpha = "auto" searches α (merging/alpha.py); None: the method has no α to search.
    alpha_search: ClassVar[AlphaSearch | None] = None
    # Other parameters that accept "auto": chosen on validation data by the evaluation pipeline
    # before the merge (consensus: the per-task TALL-mask λ), never seen as "auto" by merge().
    validation_searched: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: MethodParams, ctx: MergeContext):
        self.params = params
        self.ctx = ctx

    # -- planning -------------------------------------------------------------------------
    @classmethod
    def check_experts(cls, params: MethodParams, n_experts: int) -> str | None:
        """A message naming ``params.<field>`` when the parameters do not fit ``n_experts``."""
        return None

    def check_plan(self, keys: list[tuple[str, RoleInfo, tuple[int, ...]]]) -> None:
        """Raise a MergeError before any tensor is read if the plan cannot work (e.g. missing calibration)."""

    # -- streaming ------------------------------------------------------------------------
    def observe(self, pass_index: int, job: TensorJob) -> None:
        raise NotImplementedError

    def end_pass(self, pass_index: int) -> None:
        pass

    def merge(self, job: TensorJob) -> torch.Tensor:
        raise NotImplementedError

    # -- memory: row blocks -----------------------------------------------------------------
    # Arrays the size of a job's stacked task vectors that ``merge`` allocates at its peak, beyond
    # the task vectors themselves (TIES: the trimmed copy, |τ| and the masks): the engine sizes row
    # blocks, and preflight estimates a job's peak, from it.
    working_copies: ClassVar[float] = 1.0

    def row_blockable(self, role: RoleInfo, shape: tuple[int, ...]) -> bool:
        """Whether rows [a, b) of this key's merge depend only on rows [a, b) of its task vectors,
        so that the engine may merge a key too large for the memory budget in row blocks (and run
        the pre-passes over them). Element-wise methods say yes; a method that needs the whole
        matrix (an SVD, a per-tensor ranking) says no for those keys."""
        return False

    def draw(self, key: str, task_shape: tuple[int, ...], n_experts: int, block: RowBlock | None) -> Any:
        """Random draws for the job of ``key`` (``block`` of it; one task vector has ``task_shape``,
        as ``merge`` sees it), made on the reading thread in plan and row order, so that a key
        merged in row blocks draws the same stream as when merged whole; ``merge`` finds them in
        ``job.draws``. Methods without randomness draw nothing."""
        return None

    def alpha_scaled(self, job: TensorJob) -> bool:
        """Whether this key is written as θ0 + α·τ (True) or θ0 + τ (False, e.g. ESM's non-ESD keys)."""
        return True

    def coefficient(self, job: TensorJob) -> float:
        return self.params.alpha if self.alpha_scaled(job) else 1.0

    # -- deferred scaling ------------------------------------------------------------------
    def rescale_group(self, job: TensorJob) -> str | None:
        return None

    def group_factors(self, norms: dict[str, dict[str, float]]) -> dict[str, float]:
        return {}

    # -- what the diagnostics need to know ------------------------------------------------------
    # Whether the merged matrix is built from orthonormal (polar or SVD) factors: the diagnostics
    # then report the interference (STI) of the orthogonalised task factors after the merge; a
    # method that keeps the task factors (a sum) has the same STI after as before.
    orthogonalises: ClassVar[bool] = False

    @classmethod
    def truncation(cls, params: MethodParams, shape: tuple[int, int], n_tasks: int, role: Role | None) -> Truncation | None:
        """What the method keeps of each of the ``n_tasks`` task matrices of a matrix key of
        ``shape`` (out, in) and ``role`` (None: unknown), or None when it cuts nothing."""
        return None

    @classmethod
    def sar_basis(cls, params: MethodParams, role: Role | None) -> SarBasis:
        """Which matrix's left singular vectors order the directions for SAR (ALGORITHMS.md §2.4):
        ``"merged"``, or ``"task_sum"`` (the sum of the task matrices) for a merge that flattens
        the spectrum of the merged matrix, whose own singular vectors are then in no order."""
        return "merged"


class MatrixMethod(MergeMethod):
    """The SVD methods' shape: matrices (``job.is_matrix``) go to ``merge_matrix``; every other
    tensor is the arithmetic mean of its task vectors (ALGORITHMS.md §0)."""

    working_copies = 3.0  # float64 Grams, eigenvectors and polar factors of the matrix keys

    def merge(self, job: TensorJob) -> torch.Tensor:
        return self.merge_matrix(job) if job.is_matrix else job.taus.mean(0)

    def row_blockable(self, role: RoleInfo, shape: tuple[int, ...]) -> bool:
        return not is_matrix(role, shape)  # the mean is element-wise; a matrix's SVD needs all of it

    def merge_matrix(self, job: TensorJob) -> torch.Tensor:
        raise NotImplementedError

"""How much memory a merge may take, and how the engine keeps to it.

The budget (``options.memory_budget``, capped by the worker's own; by default half the memory the
process may use) bounds the estimated peak of the merge jobs in flight. A key whose job would not
fit one worker's share of it is merged in row blocks when its method allows that (element-wise
methods, and the mean-merged tensors of the SVD methods), so memory does not grow with the number
of experts or the vocabulary. A key that its method needs whole and that does not fit the whole
budget is refused before any tensor is read, naming the key.

Estimates are per job: the T task vectors in the compute dtype, the method's working copies of
them (``MergeMethod.working_copies``), the base, the merged task vector, c·τ and θ0 + c·τ, and
the inputs as read when they are stored in another dtype (cast by the worker). ``docs/ENGINE.md`` states them per method.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from merging.errors import MemoryBudgetError
from merging.methods.base import MergeMethod, RowBlock

if TYPE_CHECKING:  # plan imports this module for preflight
    from merging.plan import PlanItem


# The compute-dtype arrays of one tile (the T task vectors, the base rows, the merged rows) should
# stay in the last-level cache beside the other workers' tiles (32 MiB L3 shared by the 2-vCPU EPYC
# VMs that bench/RESULTS.md measures on). A tile costs ~40 torch calls whatever its size, which at
# 1 MiB was as much time as the arithmetic: 8B-shaped Task Arithmetic, T = 8, took 20.8 s with
# 1 MiB tiles, 13.4 s with 4 MiB, 12.3 s with 8 MiB and 12.4 s with 16 MiB (2026-12-08).
TILE_BYTES = 8 << 20


def tile_rows(per_row: int, n_experts: int, itemsize: int, tile_bytes: int) -> int:
    """Rows of one tile of ``tile_bytes`` (``TaskVectorLoader.tiles``) for rows of ``per_row`` elements."""
    return max(1, tile_bytes // max(1, per_row * itemsize * (n_experts + 4)))


def tile_size(budget: int, workers: int) -> int:
    """Bytes of one tile: ``TILE_BYTES``, or a 64th of a worker's share of a small budget."""
    return max(16 << 10, min(TILE_BYTES, budget // max(1, workers) // 64))


def default_workers() -> int:
    """Tensors merged at once on CPU when the spec does not say: one per usable core, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def worker_count(requested: int | None, device: torch.device) -> int:
    """options.workers as the merge pass runs it: one on a GPU (one stream of kernels; the GPU
    parallelises within a tensor), else as requested or one per core."""
    if device.type != "cpu":
        return 1
    return requested or default_workers()


def memory_bytes() -> int | None:
    """Memory this process may use: the cgroup limit when there is one (containers), else physical RAM."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            return int(limit)
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def default_memory_budget() -> int:
    """The budget when neither the spec nor the worker sets one: half the memory this process may
    use (the rest is for the page cache that streams the inputs, Python and torch)."""
    memory = memory_bytes()
    return memory // 2 if memory else 8 << 30


def effective_budget(spec_budget: int | None, worker_budget: int | None) -> int:
    """The smaller of the spec's and the worker's budgets; the default when neither is set."""
    given = [b for b in (spec_budget, worker_budget) if b]
    return min(given) if given else default_memory_budget()


def peak_bytes(item: PlanItem, n_experts: int, dtype: torch.dtype, method: type[MergeMethod] | MergeMethod,
               rows: int | None = None, tiled: int = 0, held: bool = False) -> int:
    """The estimated peak memory of one merge job over ``rows`` rows of ``item`` (all by default).
    A job ``tiled`` (in tiles of that many bytes) holds its inputs as read and its output (in the compute
    dtype when ``held`` back for an α search); its task vectors and the method's arrays are tile-sized."""
    per_row = math.prod(item.shape[1:]) if item.shape else 1
    elements = per_row * ((item.shape[0] if item.shape else 1) if rows is None else rows)
    if tiled:  # the inputs as read and the output whole; a tile's task vectors, the method's copies, base and merged
        out = dtype.itemsize if held else item.out_dtype.itemsize
        tile = min(math.prod(item.shape), per_row * tile_rows(per_row, n_experts, dtype.itemsize, tiled))
        return int(elements * ((n_experts + 1) * item.in_dtype.itemsize + out)
                   + tile * dtype.itemsize * (n_experts * (1 + method.working_copies) + 2))
    stacked = n_experts * (1 + method.working_copies)
    # inputs in another dtype (bf16 checkpoints) are held as read until a worker casts them
    as_read = (n_experts + 1) * item.in_dtype.itemsize if item.in_dtype != dtype else 0
    return int(elements * (dtype.itemsize * (stacked + 4)) + elements * as_read)


# What a merging process holds besides the merge jobs: the interpreter, torch, the checkpoint headers
# (253 MB measured after preflight, 2026-12-08; a service worker also holds its web and evaluation
# libraries, which this leaves out).
RUNTIME_BYTES = 256 << 20


def format_bytes(n: int | float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass
class MemoryPlan:
    """What the merge pass runs at once: the budget, the workers, each merged key's row blocks
    (absent: merged whole) and the estimated peak of one of its jobs."""
    budget: int
    workers: int
    blocks: dict[int, list[RowBlock]]  # plan index -> its row blocks, for keys merged in blocks
    peaks: dict[int, int]  # plan index -> estimated peak of one job (one block, for keys in blocks)
    tiled: set[int] = field(default_factory=set)  # plan indices merged in cache-sized tiles
    tile_bytes: int = TILE_BYTES

    @property
    def window(self) -> int:
        """Estimated bytes of the jobs in flight at most (``MergePool``'s budget): the memory
        budget, or less when the largest job times the workers fits in it (reading ahead stops there)."""
        largest = max(self.peaks.values(), default=0)
        return min(self.budget, self.workers * largest) if largest else self.budget

    @property
    def estimated_peak(self) -> int:
        """The merging process's estimated peak memory: the runtime, plus the jobs in flight at
        most: the window (the pool admits a job only when it fits beside those in flight), or a
        larger job alone, and never more than all jobs together."""
        largest = max(self.peaks.values(), default=0)
        total = sum(p * len(self.blocks.get(i, [None])) for i, p in self.peaks.items())
        return RUNTIME_BYTES + min(max(self.window, largest), total)

    def report(self, plan: list[PlanItem]) -> dict:
        """The memory plan as ``validate`` and merge.json state it."""
        blocked = [{"key": plan[i].key, "row_blocks": len(b), "rows_per_block": b[0].stop - b[0].start}
                   for i, b in sorted(self.blocks.items())]
        largest = max(self.peaks, key=self.peaks.get, default=None)
        return {"budget_bytes": self.budget, "workers": self.workers, "estimated_peak_bytes": self.estimated_peak,
                "largest_job": None if largest is None else {"key": plan[largest].key, "bytes": self.peaks[largest],
                                                             "row_blocks": len(self.blocks.get(largest, [None]))},
                "row_blocked": blocked}

    def smallest_block_array(self, plan: list[PlanItem], dtype: torch.dtype) -> int | None:
        """Bytes of the smallest one-tensor array of a row block (one expert's rows as read, its
        base rows, its merged rows), or None when no key is merged in row blocks."""
        sizes = [math.prod(plan[i].shape[1:]) * (b[0].stop - b[0].start) * min(dtype.itemsize, plan[i].in_dtype.itemsize)
                 for i, b in self.blocks.items()]
        return min(sizes, default=None)

    def largest_task_vectors(self, items: list[PlanItem], n_experts: int, dtype: torch.dtype) -> int:
        """Bytes of the largest job's stacked task vectors (the loader recycles buffers of this size)."""
        sizes = [n_experts * dtype.itemsize * _elements(items[i], self.blocks.get(i)) for i in self.peaks if i not in self.tiled]
        return max(sizes, default=0)


def _elements(item: PlanItem, blocks: list[RowBlock] | None) -> int:
    n = math.prod(item.shape)
    if blocks is None:
        return n
    return n // item.shape[0] * max(b.stop - b.start for b in blocks)


def plan_memory(plan: list[PlanItem], n_experts: int, dtype: torch.dtype, method: MergeMethod, budget: int,
                workers: int, tiles: bool = False, whole_keys: frozenset[str] = frozenset(), held: bool = False) -> MemoryPlan:
    """Row blocks for the keys whose job does not fit one worker's share of ``budget``; raises
    ``MemoryBudgetError`` for a key that must be merged whole and does not fit the whole budget.
    With ``tiles`` (on CPU), the keys the method merges row by row are merged in cache-sized tiles,
    except ``whole_keys`` (those the diagnostics analyse whole) and a whole transposed matrix (its
    stored rows are not the method's rows); ``held``: the merged keys are held back for an α search."""
    share = max(1, budget // max(1, workers))
    tile_bytes = tile_size(budget, workers)
    blocks: dict[int, list[RowBlock]] = {}
    peaks: dict[int, int] = {}
    tiled: set[int] = set()
    for i, item in enumerate(plan):
        if item.action != "merge":
            continue
        if (tiles and math.prod(item.shape or (0,)) and item.key not in whole_keys and method.row_blockable(item.role, item.shape)
                and not (item.role.transposed and len(item.shape) == 2)):
            tiled.add(i)
        kind = {"tiled": tile_bytes if i in tiled else 0, "held": held}
        whole = peak_bytes(item, n_experts, dtype, method, **kind)
        if whole <= share or not item.shape or not method.row_blockable(item.role, item.shape):
            if whole > budget:
                raise MemoryBudgetError(
                    f"tensor {item.key!r} (shape {list(item.shape)}) needs about {format_bytes(whole)} to merge with "
                    f"{method.name!r} and {n_experts} experts, more than the memory budget of {format_bytes(budget)}; "
                    "the method needs it whole: raise options.memory_budget (or the worker's SUBMERGE_MEMORY_BUDGET), "
                    "or list the key in passthrough", field="options.memory_budget")
            peaks[i] = whole
            continue
        fixed = peak_bytes(item, n_experts, dtype, method, rows=0, **kind)
        per_row = max(1, peak_bytes(item, n_experts, dtype, method, rows=1, **kind) - fixed)
        per_block = max(1, min(item.shape[0], max(0, share - fixed) // per_row))
        blocks[i] = _row_blocks(item.shape[0], per_block)
        peaks[i] = peak_bytes(item, n_experts, dtype, method, rows=per_block, **kind)
    return MemoryPlan(budget, workers, blocks, peaks, tiled, tile_bytes)


def copy_blocks(shape: tuple[int, ...], itemsize: int, budget: int) -> list[RowBlock] | None:
    """Row blocks to copy a base tensor through memory in (None: at once), a tenth of the budget each."""
    nbytes = math.prod(shape) * itemsize
    if not shape or nbytes <= budget // 10:
        return None
    return _row_blocks(shape[0], max(1, (budget // 10) // max(1, nbytes // shape[0])))


def _row_blocks(rows: int, per_block: int) -> list[RowBlock]:
    """Rows ``[0, rows)`` in blocks of ``per_block`` (the last one shorter)."""
    return [RowBlock(a, min(a + per_block, rows), rows) for a in range(0, rows, per_block)]

"""Tensors through memory, one key at a time: read in (``TaskVectorLoader``), merged a few at a
time on worker threads within a memory budget (``MergePool``), held on disk when their final
scale waits on other keys (``Spill``), and the merged task vector seen whole by an α search
(``TaskVector``).

Memory: at any time the engine holds one key's base tensor, its T expert tensors and their
task vectors per job in flight (plus what the method needs for that key). Output is written at
precomputed offsets as it is produced, so no output shard is buffered either.
"""
from __future__ import annotations

import concurrent.futures
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from merging.errors import IncompatibleCheckpointsError, NonFiniteInputError
from merging.io.checkpoint import Checkpoint
from merging.memory import TILE_BYTES, tile_rows
from merging.methods.base import RowBlock, TensorJob
from merging.plan import PlanItem


class TaskVectorLoader:
    """Reads one key from every checkpoint and forms the task vectors on the compute device.

    On CPU, the task-vector buffers of the largest tensors are recycled: a fresh 75 MB buffer (8
    experts × 3072 × 768 float32) costs ~35 ms of page faults, as the kernel zeroes each 4 KB
    page on first touch; a recycled one costs nothing. Recycled buffers have the size of the
    largest job and serve only jobs of at least half that size. The engine's window holds at
    most workers × the largest job, so at most 2 × workers such jobs are in flight or loading,
    and recycled buffers can take at most twice the memory fresh ones would; on the 12-block
    ViT-B/16 benchmark peak RSS rose by 30–45 MB. (Serving every job ≥ 4 MB let a window full
    of 19 MB jobs hold 75 MB buffers each: +100–150 MB.) ``release(index)`` returns the buffer
    of the job loaded with that plan index once nothing reads it any more (the engine calls it
    after storing the job's result)."""

    RECYCLE_BYTES = 4 << 20  # below this (biases, norms, small models) page faults cost little

    def __init__(self, base: Checkpoint, experts: list[Checkpoint], device: torch.device, dtype: torch.dtype,
                 check_finite: bool, largest_job: int = 0, tile_bytes: int = TILE_BYTES):
        self.base, self.experts, self.device, self.dtype, self.check_finite = base, experts, device, dtype, check_finite
        self.tile_bytes = tile_bytes
        self._buffer_bytes = largest_job if device.type == "cpu" and largest_job >= self.RECYCLE_BYTES else 0
        self._free: list[torch.Tensor] = []
        self._owned: dict[tuple, torch.Tensor] = {}  # (plan index, rows) of a loaded job -> its recycled buffer

    def _task_buffer(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        nbytes = math.prod(shape) * self.dtype.itemsize
        if not self._buffer_bytes or nbytes < self.RECYCLE_BYTES or not self._buffer_bytes <= 2 * nbytes <= 2 * self._buffer_bytes:
            return torch.empty(shape, dtype=self.dtype, device=self.device), None
        raw = self._free.pop() if self._free else torch.empty(self._buffer_bytes, dtype=torch.uint8)
        return raw[:nbytes].view(self.dtype).view(shape), raw

    def release(self, index: int, block: RowBlock | None = None) -> None:
        """The task vectors loaded with plan index ``index`` (and ``block``) will not be read again."""
        raw = self._owned.pop((index, None if block is None else (block.start, block.stop)), None)
        if raw is not None:
            self._free.append(raw)

    def _check_duplicate(self, ex: Checkpoint, key: str, table: torch.Tensor, rows: tuple[int, int] | None) -> None:
        """The untied head that ``ex`` saves beside ``key`` must equal it (merging/tied_heads.py)."""
        head = ex.tied_duplicates[key]
        copy = ex.read_meta(head, rows=rows).to(table.device, table.dtype)
        if not torch.equal(copy.reshape(table.shape), table):
            where = "" if rows is None else f" (in rows {rows[0]}..{rows[1]})"
            raise IncompatibleCheckpointsError(
                f"{ex.label} saves an untied {head.key!r} that differs from its {key!r}{where}, but the base ties its head "
                f"to {key!r}: merge it with a base saved untied, or save the expert tied (tie_word_embeddings)")

    def _check_finite(self, key: str, rows: tuple[int, int] | None, taus: torch.Tensor, base: torch.Tensor) -> None:
        """Refuse NaN/Inf in the task vectors or the base (with ``check_finite``). NaN/Inf in any
        input makes the sum non-finite: one fused pass over both. (A finite but huge sum also
        fails this; then the exact check decides.)"""
        if self.check_finite and not bool(torch.isfinite(taus.sum() + base.sum())):
            if not (bool(torch.isfinite(base).all()) and bool(torch.isfinite(taus).all())):
                self._explain_non_finite(key, rows)

    def _explain_non_finite(self, key: str, rows: tuple[int, int] | None) -> None:
        for ckpt in (self.base, *self.experts):
            self.read_checked(ckpt, key, rows)  # raises naming the checkpoint if its stored values are NaN/Inf
        raise NonFiniteInputError(f"tensor {key!r} overflows {str(self.dtype).removeprefix('torch.')} when converted "
                                  "for computation (set options.compute_dtype to float64)")

    def read_checked(self, ckpt: Checkpoint, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """``key`` (or those ``rows`` of it) as stored in ``ckpt``, refused (naming the checkpoint) if it holds NaN/Inf."""
        t = ckpt.read(key, rows=rows)
        if self.check_finite and t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteInputError(f"tensor {key!r} in {ckpt.label} has {bad} NaN/Inf value(s)")
        return t

    def load_base(self, item: PlanItem) -> torch.Tensor:
        """The base tensor of ``item`` on the compute device, in the compute dtype, oriented (out, in)."""
        t = self.read_checked(self.base, item.key).to(self.device, self.dtype)
        return t.mT if item.role.transposed and len(item.shape) == 2 else t

    def load_base_rows(self, item: PlanItem, block: RowBlock) -> torch.Tensor:
        """Rows of the base tensor of ``item`` on the compute device, in the compute dtype, as stored."""
        return self.read_checked(self.base, item.key, (block.start, block.stop)).to(self.device, self.dtype)

    def load(self, item: PlanItem, index: int, block: RowBlock | None = None) -> tuple[torch.Tensor, TensorJob]:
        """The base tensor and the merge job of ``item`` (``index``: its plan position): the whole
        key oriented (out, in), or with ``block`` those rows as stored: ``prepare(read(...))``."""
        return self.prepare(self.read(item, index, block))

    def read(self, item: PlanItem, index: int, block: RowBlock | None = None, tiled: bool = False) -> "ReadInputs":
        """One job's inputs as stored: the reading half of ``load``, for the reading thread. Experts
        in the compute dtype are read straight into the task-vector buffer; the others (bf16
        checkpoints) are cast by ``prepare``, on a merge worker, so that reading never waits on it.
        With ``tiled`` there is no task-vector buffer: every input stays as stored, for ``tiles``."""
        rows = None if block is None else (block.start, block.stop)
        if tiled:  # mapped where the format allows: tiles read each input once, from the page cache
            stored = [_mapped_or_read(ck, item.key, rows) for ck in (self.base, *self.experts)]
            return ReadInputs(item, index, block, stored[0], stored[1:], None)
        base = self.base.read(item.key, rows=rows)
        taus, raw = self._task_buffer((len(self.experts), *base.shape))
        stored: list[torch.Tensor | None] = []
        for i, ex in enumerate(self.experts):
            if self.device.type == "cpu" and ex.metas[item.key].dtype == self.dtype:
                ex.read(item.key, out=taus[i], rows=rows)
                stored.append(None)
            else:
                stored.append(ex.read(item.key, rows=rows))
        if raw is not None:
            self._owned[(index, rows)] = raw
        return ReadInputs(item, index, block, base, stored, taus)

    def tiles(self, inputs: "ReadInputs", draws: Any = None) -> Iterator[tuple[torch.Tensor, TensorJob]]:
        """The job of ``inputs`` (read with ``tiled``) as row tiles small enough for the cache
        (``merging.memory.tile_size``): for each, the base rows in the compute dtype and the tile's job (its
        ``block``: the tile's rows of the key; ``draws`` sliced to them). Each input is read from
        memory once and every pass of the method runs on cached data: merging a large job whole
        makes each of the method's passes, and the casts, a trip through memory (the 8B-shaped Task
        Arithmetic spent most of its time there). The tiles hold the same values as the whole job,
        so an element-wise method merges them to the same bits. The tiles share one buffer: use
        each before asking for the next."""
        item, block, n_experts = inputs.item, inputs.block, len(self.experts)
        rows = None if block is None else (block.start, block.stop)
        offset, total = (0, item.shape[0]) if block is None else (block.start, block.rows)
        for ex, stored in zip(self.experts, inputs.experts):
            if item.key in ex.tied_duplicates:
                self._check_duplicate(ex, item.key, stored.to(self.device, self.dtype), rows)
        n, rest = inputs.base.shape[0], tuple(inputs.base.shape[1:])
        step = tile_rows(math.prod(rest), n_experts, self.dtype.itemsize, self.tile_bytes)
        buffer = torch.empty((n_experts, min(step, n), *rest), dtype=self.dtype, device=self.device)
        for a in range(0, n, step):
            b = min(a + step, n)
            if b - a < buffer.shape[1]:  # the short last tile: contiguous like the others
                buffer = torch.empty((n_experts, b - a, *rest), dtype=self.dtype, device=self.device)
            base = inputs.base[a:b].to(self.device, self.dtype)
            for i, stored in enumerate(inputs.experts):  # cast, then subtract: the same bits as ``prepare``, and
                buffer[i].copy_(stored[a:b]).sub_(base)  # faster than one mixed-dtype torch.sub (vectorised casts)
            self._check_finite(item.key, rows, buffer, base)
            tile = RowBlock(offset + a, offset + b, total)
            yield base, TensorJob(item.key, item.role, buffer, inputs.index, tile, None if draws is None else draws[:, a:b])

    def prepare(self, inputs: "ReadInputs") -> tuple[torch.Tensor, TensorJob]:
        """The computing half of ``load``: the inputs in the compute dtype, the task vectors formed
        and checked (finite; an untied head against its table), oriented (out, in) when whole.
        Experts stored in another floating dtype than the base are cast like it."""
        item, block = inputs.item, inputs.block
        rows = None if block is None else (block.start, block.stop)
        base, taus = inputs.base.to(self.device, self.dtype), inputs.taus
        if taus is None:  # read for tiles
            taus = torch.empty((len(self.experts), *base.shape), dtype=self.dtype, device=self.device)
        for i, (ex, stored) in enumerate(zip(self.experts, inputs.experts)):
            if item.key in ex.tied_duplicates:
                self._check_duplicate(ex, item.key, taus[i] if stored is None else stored.to(self.device, self.dtype), rows)
            if stored is None:
                taus[i] -= base
            else:  # cast and subtract in one pass, into the buffer (the same bits as casting first)
                torch.sub(stored.to(self.device), base, out=taus[i])
        inputs.experts = []  # the stored copies are not needed any more
        self._check_finite(item.key, rows, taus, base)
        if block is None and item.role.transposed and len(item.shape) == 2:
            base, taus = base.mT, taus.mT
        return base, TensorJob(item.key, item.role, taus, inputs.index, block)


def _mapped_or_read(ckpt: Checkpoint, key: str, rows: tuple[int, int] | None) -> torch.Tensor:
    mapped = ckpt.view(key, rows)
    return ckpt.read(key, rows=rows) if mapped is None else mapped


@dataclass
class ReadInputs:
    """One merge job's inputs as read: the base and the experts as stored (None for an expert read
    straight into ``taus``, the task-vector buffer)."""
    item: PlanItem
    index: int
    block: RowBlock | None
    base: torch.Tensor
    experts: list[torch.Tensor | None]
    taus: torch.Tensor | None  # None when read for tiles

    @property
    def task_shape(self) -> tuple[int, ...]:
        """One task vector's shape as the method sees it: oriented (out, in) when whole."""
        shape = tuple(self.base.shape)
        return shape[::-1] if self.block is None and self.item.role.transposed and len(shape) == 2 else shape


def merged_weight(base: torch.Tensor, tau: torch.Tensor, coefficient: float, item: PlanItem,
                  block: RowBlock | None = None) -> torch.Tensor:
    """θ0 + c·τ, back in the checkpoint's layout (row blocks are in it already). Computed in
    ``tau``'s memory (the same bits as ``base + c * tau``, without two more arrays): ``tau`` is
    overwritten."""
    out = tau.mul_(coefficient).add_(base)
    if block is None and item.role.transposed and len(item.shape) == 2:
        out = out.mT
    return out


class MergePool:
    """Runs merge jobs on ``workers`` threads, each with one torch thread, and hands every result
    to ``store(index, result)`` on the calling thread as soon as its job finishes.

    The caller reads inputs in plan order; what may be in flight is bounded in bytes (``budget``:
    the memory plan's window, each job counted at its estimated peak), not in jobs: a count would let a bias queued behind a large
    matrix idle a worker, and the count of large matrices is what bounds memory. Results are
    stored as jobs finish (the writer takes tensors in any order), not in plan order: a finished
    job waiting behind a longer one would hold the window shut while a worker idles (ESM: the
    12 s c_fc layer next to the 6 s c_proj one, 20 % of the time lost).

    With one worker there is no pool: each job runs on the calling thread, on torch's own threads.
    """

    def __init__(self, workers: int, budget: int, store: Callable[[Any, Any], None]):
        self._store, self._budget = store, budget
        # OpenMP's thread count is per OS thread: a pool thread that does not set its own runs
        # every op on all cores (2 workers × 2 OpenMP threads on 2 cores: 1.4× slower, measured).
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge",
                                                           initializer=torch.set_num_threads, initargs=(1,)) if workers > 1 else None
        self._pending: dict[concurrent.futures.Future, tuple[Any, int]] = {}  # job -> (its position, bytes it holds)

    def __enter__(self) -> "MergePool":
        self._threads = torch.get_num_threads()
        if self._pool is not None:
            torch.set_num_threads(1)
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            for fut in self._pending:
                fut.cancel()
            self._pool.shutdown(wait=True)
            torch.set_num_threads(self._threads)

    def submit(self, index: Any, nbytes: int, fn: Callable[..., Any], *args) -> None:
        """Run ``fn(*args)``, the job at position ``index`` (sortable: the plan index, and the first
        row of a row block) holding about ``nbytes`` (inline without a pool), once ``make_room(nbytes)``
        has made room for it."""
        if self._pool is None:
            self._store(index, fn(*args))
        else:
            self._pending[self._pool.submit(fn, *args)] = (index, nbytes)

    def make_room(self, nbytes: int) -> None:
        """Store the jobs already finished; wait until a job of ``nbytes`` fits beside those in
        flight within the budget (a job larger than the budget waits until it is alone). Call it
        before reading the job's inputs."""
        if not self._pending:
            return
        self._store_finished(wait=False)
        while self._pending and sum(n for _, n in self._pending.values()) + nbytes > self._budget:
            self._store_finished(wait=True)

    def drain(self) -> None:
        """Store every remaining job as it finishes."""
        while self._pending:
            self._store_finished(wait=True)

    def _store_finished(self, wait: bool) -> None:
        """Store every finished job (with ``wait``, after at least one has finished)."""
        done, _ = concurrent.futures.wait(list(self._pending), timeout=None if wait else 0,
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        for fut in sorted(done, key=lambda f: self._pending[f][0]):
            index, _ = self._pending.pop(fut)
            self._store(index, fut.result())


# -- merged task vectors held back on disk --------------------------------------------------------

@dataclass
class SpilledKey:
    item: PlanItem
    group: str  # the method's rescale group, or "" when only the α search holds the key back
    coefficient: float  # c in θ0 + c·τ
    alpha_scaled: bool  # c is α (else 1)
    blocks: list[RowBlock] | None  # held back in these row blocks (as stored), or None: whole (oriented)
    paths: dict[int, str]  # first row of each part (0 when whole) -> its file


class Spill:
    """Merged task vectors (before α) kept on disk until every key is merged: when a method scales
    a key by its group's norms (ESM's inter-layer scaling) and when α is chosen on validation data.
    Keys (and row blocks) arrive in any order (jobs finish in any order); ``put_in_order`` then puts
    them, and the group norms, back in plan and row order, so that sums over them round the same
    from run to run."""

    def __init__(self, directory: str):
        self.directory = directory  # created on first use
        self.keys: dict[str, SpilledKey] = {}
        self.norms: dict[str, dict[str, float]] = {}  # rescale group -> key -> ‖τ‖
        self._norm_parts: dict[str, dict[str, dict[int, float]]] = {}  # group -> key -> first row -> ‖rows‖

    def put(self, index: int, item: PlanItem, tau: torch.Tensor, group: str, coefficient: float, norm: float | None,
            alpha_scaled: bool, block: RowBlock | None = None) -> None:
        os.makedirs(self.directory, exist_ok=True)
        start = 0 if block is None else block.start
        path = os.path.join(self.directory, f"{index}.pt" if block is None else f"{index}.{start}.pt")
        torch.save(tau, path)
        if group:
            self._norm_parts.setdefault(group, {}).setdefault(item.key, {})[start] = norm
        entry = self.keys.get(item.key)
        if entry is None:
            entry = self.keys[item.key] = SpilledKey(item, group, coefficient, alpha_scaled, None if block is None else [], {})
        entry.paths[start] = path
        if block is not None:
            entry.blocks.append(block)

    def put_in_order(self, position: dict[str, int]) -> None:
        self.keys = dict(sorted(self.keys.items(), key=lambda kv: position[kv[0]]))
        for entry in self.keys.values():
            if entry.blocks is not None:
                entry.blocks.sort(key=lambda b: b.start)
        self.norms = {g: {key: _combined_norm(parts) for key, parts in sorted(n.items(), key=lambda kv: position[kv[0]])}
                      for g, n in sorted(self._norm_parts.items())}

    def set_alpha(self, alpha: float) -> None:
        for entry in self.keys.values():
            entry.coefficient = alpha if entry.alpha_scaled else 1.0

    def load(self, key: str) -> torch.Tensor:
        """The whole held-back τ of ``key``: oriented (out, in) when held whole, as stored when in row blocks."""
        entry = self.keys[key]
        if entry.blocks is None:
            return torch.load(entry.paths[0], weights_only=True)
        return torch.cat([self.load_block(key, b) for b in entry.blocks])

    def load_block(self, key: str, block: RowBlock) -> torch.Tensor:
        return torch.load(self.keys[key].paths[block.start], weights_only=True)

    def remove(self, key: str) -> None:
        for path in self.keys[key].paths.values():
            os.unlink(path)

    def close(self) -> None:
        """Remove the (emptied) directory."""
        os.rmdir(self.directory)


def _combined_norm(parts: dict[int, float]) -> float:
    """‖τ‖ of a key from the norms of its parts, summed in row order (one part: itself, exactly)."""
    if len(parts) == 1:
        return next(iter(parts.values()))
    return math.sqrt(sum(parts[start] ** 2 for start in sorted(parts)))


class TaskVector:
    """The merged task vector before α, as ``choose_alpha`` sees it: θ(α) = θ0 + c(α)·τ per merged
    key, with c(α) = α for α-scaled keys and 1 for the others (ESM's non-ESD keys). Keys not
    listed are copied from the base. Tensors come back in checkpoint layout, on the CPU, in the
    compute dtype; each ``read`` loads one key from the engine's spill directory."""

    def __init__(self, base: Checkpoint, spill: Spill, factors: dict[str, float]):
        self._base, self._spill, self._factors = base, spill, factors

    def keys(self) -> list[str]:
        return list(self._spill.keys)

    def alpha_scaled(self, key: str) -> bool:
        return self._spill.keys[key].alpha_scaled

    def read(self, key: str) -> torch.Tensor:
        entry = self._spill.keys[key]
        tau = self._spill.load(key) * self._factors.get(key, 1.0)
        oriented = entry.blocks is None and entry.item.role.transposed and len(entry.item.shape) == 2
        return tau.mT.contiguous() if oriented else tau

    def base(self, key: str) -> torch.Tensor:
        return self._base.read(key)

    def state(self, alpha: float, taus: dict[str, torch.Tensor] | None = None,
              bases: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """θ(α) for every merged key (in the compute dtype); pass preloaded ``taus``/``bases`` to
        avoid re-reading them for each α."""
        out = {}
        for key in self._spill.keys:
            tau = taus[key] if taus is not None else self.read(key)
            b = bases[key] if bases is not None else self.base(key)
            out[key] = b.to(tau.dtype) + (alpha if self.alpha_scaled(key) else 1.0) * tau
        return out

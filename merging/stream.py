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
from typing import Any, Callable

import torch

from merging.errors import NonFiniteInputError
from merging.io.checkpoint import Checkpoint
from merging.methods.base import TensorJob
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
                 check_finite: bool, largest_job: int = 0):
        self.base, self.experts, self.device, self.dtype, self.check_finite = base, experts, device, dtype, check_finite
        self._buffer_bytes = largest_job if device.type == "cpu" and largest_job >= self.RECYCLE_BYTES else 0
        self._free: list[torch.Tensor] = []
        self._owned: dict[int, torch.Tensor] = {}  # plan index of a loaded job -> its recycled buffer

    def _task_buffer(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
        nbytes = math.prod(shape) * self.dtype.itemsize
        if not self._buffer_bytes or nbytes < self.RECYCLE_BYTES or not self._buffer_bytes <= 2 * nbytes <= 2 * self._buffer_bytes:
            return torch.empty(shape, dtype=self.dtype, device=self.device), None
        raw = self._free.pop() if self._free else torch.empty(self._buffer_bytes, dtype=torch.uint8)
        return raw[:nbytes].view(self.dtype).view(shape), raw

    def release(self, index: int) -> None:
        """The task vectors loaded with plan index ``index`` will not be read again."""
        raw = self._owned.pop(index, None)
        if raw is not None:
            self._free.append(raw)

    def _explain_non_finite(self, key: str) -> None:
        for ckpt in (self.base, *self.experts):
            self.read_checked(ckpt, key)  # raises naming the checkpoint if its stored values are NaN/Inf
        raise NonFiniteInputError(f"tensor {key!r} overflows {str(self.dtype).removeprefix('torch.')} when converted "
                                  "for computation (set options.compute_dtype to float64)")

    def read_checked(self, ckpt: Checkpoint, key: str) -> torch.Tensor:
        """``key`` as stored in ``ckpt``, refused (naming the checkpoint) if it holds NaN/Inf."""
        t = ckpt.read(key)
        if self.check_finite and t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteInputError(f"tensor {key!r} in {ckpt.label} has {bad} NaN/Inf value(s)")
        return t

    def load_base(self, item: PlanItem) -> torch.Tensor:
        """The base tensor of ``item`` on the compute device, in the compute dtype, oriented (out, in)."""
        t = self.read_checked(self.base, item.key).to(self.device, self.dtype)
        return t.mT if item.role.transposed and len(item.shape) == 2 else t

    def load(self, item: PlanItem, index: int) -> tuple[torch.Tensor, TensorJob]:
        base = self.base.read(item.key).to(self.device, self.dtype)
        taus, raw = self._task_buffer((len(self.experts), *item.shape))
        direct = self.device.type == "cpu" and item.in_dtype == self.dtype  # read straight into the final buffer
        for i, ex in enumerate(self.experts):
            if direct:
                ex.read(item.key, out=taus[i])
            else:
                taus[i] = ex.read(item.key).to(self.device, self.dtype)
        taus -= base
        # NaN/Inf in any input makes the sum non-finite: one fused pass over the task vectors and the
        # base. (A finite but huge sum also fails this; then the exact check below decides.)
        if self.check_finite and not bool(torch.isfinite(taus.sum() + base.sum())):
            if not (bool(torch.isfinite(base).all()) and bool(torch.isfinite(taus).all())):
                self._explain_non_finite(item.key)
        if item.role.transposed and len(item.shape) == 2:
            base, taus = base.mT, taus.mT
        if raw is not None:
            self._owned[index] = raw
        return base, TensorJob(item.key, item.role, taus, index)


def merged_weight(base: torch.Tensor, tau: torch.Tensor, coefficient: float, item: PlanItem) -> torch.Tensor:
    """θ0 + c·τ, back in the checkpoint's layout."""
    out = base + coefficient * tau
    if item.role.transposed and len(item.shape) == 2:
        out = out.mT
    return out


# -- how many tensors at once --------------------------------------------------------------------

def default_workers() -> int:
    """Tensors merged at once on CPU when the spec does not say: one per usable core, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


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


def default_worker_count(largest_job: int) -> int:
    """options.workers when the spec does not say: one per core, and few enough that the jobs in
    flight (with float64 working copies, ~3× their inputs) stay within a quarter of the memory:
    a 7B model's 0.5 GB embedding × 9 checkpoints is a 4.7 GB job."""
    workers = default_workers()
    memory = memory_bytes()
    if memory and largest_job > 0:
        workers = min(workers, max(1, memory // 4 // (3 * largest_job)))
    return workers


def job_bytes(item: PlanItem, n_experts: int, dtype: torch.dtype) -> int:
    """Memory one merge job holds: the base and every task vector of one tensor."""
    return (n_experts + 1) * math.prod(item.shape) * dtype.itemsize


class MergePool:
    """Runs merge jobs on ``workers`` threads, each with one torch thread, and hands every result
    to ``store(index, result)`` on the calling thread as soon as its job finishes.

    The caller reads inputs in plan order; what may be in flight is bounded in bytes (``budget``:
    workers times the largest job), not in jobs: a count would let a bias queued behind a large
    matrix idle a worker, and the count of large matrices is what bounds memory. Results are
    stored as jobs finish (the writer takes tensors in any order), not in plan order: a finished
    job waiting behind a longer one would hold the window shut while a worker idles (ESM: the
    12 s c_fc layer next to the 6 s c_proj one, 20 % of the time lost).

    With one worker there is no pool: each job runs on the calling thread, on torch's own threads.
    """

    def __init__(self, workers: int, budget: int, store: Callable[[int, Any], None]):
        self._store, self._budget = store, budget
        # OpenMP's thread count is per OS thread: a pool thread that does not set its own runs
        # every op on all cores (2 workers × 2 OpenMP threads on 2 cores: 1.4× slower, measured).
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge",
                                                           initializer=torch.set_num_threads, initargs=(1,)) if workers > 1 else None
        self._pending: dict[concurrent.futures.Future, tuple[int, int]] = {}  # job -> (plan index, bytes it holds)

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

    def submit(self, index: int, nbytes: int, fn: Callable[..., Any], *args) -> None:
        """Run ``fn(*args)``, the job of plan index ``index`` holding ``nbytes`` of inputs (inline
        without a pool). Call ``make_room`` next, once the caller holds no reference to the inputs."""
        if self._pool is None:
            self._store(index, fn(*args))
        else:
            self._pending[self._pool.submit(fn, *args)] = (index, nbytes)

    def make_room(self) -> None:
        """Store the jobs already finished; wait until the inputs in flight are below the budget."""
        if not self._pending:
            return
        self._store_finished(wait=False)
        while self._pending and sum(n for _, n in self._pending.values()) >= self._budget:
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
    path: str
    item: PlanItem
    group: str  # the method's rescale group, or "" when only the α search holds the key back
    coefficient: float  # c in θ0 + c·τ
    alpha_scaled: bool  # c is α (else 1)


class Spill:
    """Merged task vectors (before α) kept on disk until every key is merged: when a method scales
    a key by its group's norms (ESM's inter-layer scaling) and when α is chosen on validation data.
    Keys arrive in any order (jobs finish in any order); ``put_in_order`` then puts them, and the
    group norms, back in plan order, so that sums over them round the same from run to run."""

    def __init__(self, directory: str):
        self.directory = directory  # created on first use
        self.keys: dict[str, SpilledKey] = {}
        self.norms: dict[str, dict[str, float]] = {}  # rescale group -> key -> ‖τ‖

    def put(self, index: int, item: PlanItem, tau: torch.Tensor, group: str, coefficient: float, norm: float | None,
            alpha_scaled: bool) -> None:
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"{index}.pt")
        torch.save(tau, path)
        if group:
            self.norms.setdefault(group, {})[item.key] = norm
        self.keys[item.key] = SpilledKey(path, item, group, coefficient, alpha_scaled)

    def put_in_order(self, position: dict[str, int]) -> None:
        self.keys = dict(sorted(self.keys.items(), key=lambda kv: position[kv[0]]))
        self.norms = {g: dict(sorted(n.items(), key=lambda kv: position[kv[0]])) for g, n in sorted(self.norms.items())}

    def set_alpha(self, alpha: float) -> None:
        for entry in self.keys.values():
            entry.coefficient = alpha if entry.alpha_scaled else 1.0

    def load(self, key: str) -> torch.Tensor:
        return torch.load(self.keys[key].path, weights_only=True)

    def remove(self, key: str) -> None:
        os.unlink(self.keys[key].path)

    def close(self) -> None:
        """Remove the (emptied) directory."""
        os.rmdir(self.directory)


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
        item = self._spill.keys[key].item
        tau = self._spill.load(key) * self._factors.get(key, 1.0)
        return tau.mT.contiguous() if item.role.transposed and len(item.shape) == 2 else tau

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

"""The streaming merge engine: plan, (pre-passes), merge pass, deferred rescale, publish.

Memory: at any time the engine holds one key's base tensor, its T expert tensors and their
task vectors (plus what the method needs for that key). Output is written at precomputed
offsets as it is produced, so no output shard is buffered either.
"""
from __future__ import annotations

import concurrent.futures
import datetime as _dt
import fnmatch
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from merging import __version__, heap
from merging.errors import CancelledError, IncompatibleCheckpointsError, MergeError, NonFiniteInputError, OutputError, SpecError
from merging.io.checkpoint import Checkpoint, open_checkpoint
from merging.io.hashing import sha256_file
from merging.io.sources import IOConfig, redact_uri
from merging.io.writer import Publisher, ShardedWriter
from merging.linalg import all_finite
from merging.methods.base import MergeContext, MergeMethod, TensorJob
from merging.registry import get_method
from merging.roles import NON_MATRIX_2D_ROLES, Role, RoleInfo, resolve_role
from merging.spec import MergeSpec, load_spec

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class ProgressEvent:
    phase: str  # inspect | prepass i/n | merge | alpha search | rescale | diagnostics | finalize | publish | done
    done: int
    total: int
    key: str | None = None
    message: str | None = None

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


@dataclass
class PlanItem:
    key: str
    role: RoleInfo
    shape: tuple[int, ...]
    in_dtype: torch.dtype
    out_dtype: torch.dtype
    action: str  # "merge" or "copy"
    reason: str | None = None


@dataclass
class MergeResult:
    output_uri: str
    files: dict[str, dict[str, Any]]
    manifest: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    diagnostics: dict[str, Any] | None = None  # the data-free diagnostics report (also in diagnostics.json)


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SpecError("options.device: 'cuda' requested but torch sees no GPU")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def open_inputs(spec: MergeSpec, cfg: IOConfig) -> tuple[Checkpoint, list[Checkpoint]]:
    base = open_checkpoint(spec.base.uri, "base", cfg, spec.base.revision)
    experts = []
    try:
        for name, ref in zip(spec.expert_names(), spec.experts):
            experts.append(open_checkpoint(ref.uri, f"expert {name!r}", cfg, ref.revision))
    except Exception:
        base.close()
        for e in experts:
            e.close()
        raise
    return base, experts


def build_plan(spec: MergeSpec, base: Checkpoint, experts: list[Checkpoint]) -> list[PlanItem]:
    """Check that every expert matches the base key for key (names, shapes, dtypes); decide each key's action."""
    base_keys = set(base.metas)
    passthrough_patterns = spec.effective_passthrough()
    for ex in experts:
        missing = [k for k in base.metas if k not in ex.metas]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise IncompatibleCheckpointsError(f"{ex.label} is missing tensor {missing[0]!r}{more} that the base has")
        extra = [k for k in ex.metas if k not in base_keys]
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise IncompatibleCheckpointsError(f"{ex.label} has tensor {extra[0]!r}{more} that the base lacks")
        for k, m in base.metas.items():
            if any(fnmatch.fnmatchcase(k, p) for p in passthrough_patterns):
                continue  # copied from the base: the experts' own copies may differ (per-task heads)
            em = ex.metas[k]
            if em.shape != m.shape:
                raise IncompatibleCheckpointsError(f"tensor {k!r}: {ex.label} has shape {list(em.shape)}, base has {list(m.shape)}")
            if em.dtype != m.dtype:
                raise IncompatibleCheckpointsError(f"tensor {k!r}: {ex.label} has dtype {em.dtype_name}, base has {m.dtype_name}")
    overrides = spec.role_overrides()
    requested = spec.output.dtype
    plan = []
    # Read in file order: sequential I/O on every checkpoint.
    for key in sorted(base.metas, key=lambda k: (base.metas[k].file, base.metas[k].start)):
        m = base.metas[key]
        role = resolve_role(key, m.shape, overrides)
        if not m.dtype.is_floating_point:  # index buffers (position_ids, ...): never weights, whatever their shape
            plan.append(PlanItem(key, RoleInfo(Role.other, source="non-floating buffer"), m.shape, m.dtype, m.dtype, "copy",
                                 "non-floating tensor: kept from base"))
            continue
        out = m.dtype if requested == "auto" else _DTYPES[requested]
        passthrough = next((p for p in passthrough_patterns if fnmatch.fnmatchcase(key, p)), None)
        if passthrough:
            plan.append(PlanItem(key, role, m.shape, m.dtype, out, "copy", f"passthrough pattern {passthrough!r}"))
        else:
            plan.append(PlanItem(key, role, m.shape, m.dtype, out, "merge"))
    return plan


class _Progress:
    def __init__(self, callback: Callable[[ProgressEvent], Any] | None, should_cancel: Callable[[], bool] | None):
        self.callback = callback
        self.should_cancel = should_cancel

    def __call__(self, phase: str, done: int, total: int, key: str | None = None, message: str | None = None) -> None:
        if self.should_cancel is not None and self.should_cancel():
            raise CancelledError("merge cancelled")
        if self.callback is not None:
            self.callback(ProgressEvent(phase, done, total, key, message))


class _Loader:
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
            self._read(ckpt, key)  # raises naming the checkpoint if its stored values are NaN/Inf
        raise NonFiniteInputError(f"tensor {key!r} overflows {str(self.dtype).removeprefix('torch.')} when converted "
                                  "for computation (set options.compute_dtype to float64)")

    def _read(self, ckpt: Checkpoint, key: str) -> torch.Tensor:
        t = ckpt.read(key)
        if self.check_finite and t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteInputError(f"tensor {key!r} in {ckpt.label} has {bad} NaN/Inf value(s)")
        return t

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


def _job_bytes(item: PlanItem, n_experts: int, dtype: torch.dtype) -> int:
    """Memory one merge job holds: the base and every task vector of one tensor."""
    return (n_experts + 1) * math.prod(item.shape) * dtype.itemsize


def _finish(base: torch.Tensor, merged: torch.Tensor, coefficient: float, item: PlanItem) -> torch.Tensor:
    out = base + coefficient * merged
    if item.role.transposed and len(item.shape) == 2:
        out = out.mT
    return out


class TaskVector:
    """The merged task vector before α, as ``choose_alpha`` sees it: θ(α) = θ0 + c(α)·τ per merged
    key, with c(α) = α for α-scaled keys and 1 for the others (ESM's non-ESD keys). Keys not
    listed are copied from the base. Tensors come back in checkpoint layout, on the CPU, in the
    compute dtype; each ``read`` loads one key from the engine's spill directory."""

    def __init__(self, base: Checkpoint, deferred: dict, factors: dict[str, float], scaled: dict[str, bool],
                 device: torch.device, dtype: torch.dtype):
        self._base, self._deferred, self._factors, self._scaled = base, deferred, factors, scaled
        self._device, self._dtype = device, dtype

    def keys(self) -> list[str]:
        return list(self._deferred)

    def alpha_scaled(self, key: str) -> bool:
        return self._scaled[key]

    def read(self, key: str) -> torch.Tensor:
        path, item, _, _ = self._deferred[key]
        tau = torch.load(path, weights_only=True) * self._factors.get(key, 1.0)
        return tau.mT.contiguous() if item.role.transposed and len(item.shape) == 2 else tau

    def base(self, key: str) -> torch.Tensor:
        return self._base.read(key)

    def state(self, alpha: float, taus: dict[str, torch.Tensor] | None = None,
              bases: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """θ(α) for every merged key (in the compute dtype); pass preloaded ``taus``/``bases`` to
        avoid re-reading them for each α."""
        out = {}
        for key in self._deferred:
            tau = taus[key] if taus is not None else self.read(key)
            b = bases[key] if bases is not None else self.base(key)
            out[key] = b.to(tau.dtype) + (alpha if self._scaled[key] else 1.0) * tau
        return out


@dataclass
class Preflight:
    """What merge() establishes before reading any tensor (see ``preflight``)."""
    spec: MergeSpec
    plan: list[PlanItem]
    base: Checkpoint  # closed: metadata only
    experts: list[Checkpoint]
    output_problem: str | None  # why publishing would fail (e.g. the target exists), or None


def _prepare(spec: MergeSpec, cfg: IOConfig, calibration_files: dict[str, str] | None = None, *, pending_ok: bool = False):
    """Open headers, build the plan, open calibration, run the method's pre-flight check."""
    params = spec.method_params()
    method_cls = get_method(spec.method)
    device = pick_device(spec.options.device)
    base, experts = open_inputs(spec, cfg)
    try:
        plan = build_plan(spec, base, experts)
        calibration = None
        if method_cls.needs_calibration:
            from merging.calibration import open_calibration
            calibration = open_calibration(spec, cfg, calibration_files, pending_ok=pending_ok)
        ctx = MergeContext(spec.expert_names(), device, _DTYPES[spec.options.compute_dtype], calibration)
        method: MergeMethod = method_cls(params, ctx)
        method.check_plan([(p.key, p.role, p.shape) for p in plan if p.action == "merge"])
    except BaseException:
        for ck in (base, *experts):
            ck.close()
        raise
    return base, experts, plan, ctx, method


def preflight(spec: MergeSpec | dict, io: IOConfig | None = None, *, calibration_files: dict[str, str] | None = None) -> Preflight:
    """Every check merge() makes before reading a tensor, with no side effects: the spec, the
    checkpoint headers (keys, shapes, dtypes), the plan and roles, calibration coverage (statistics
    still to be captured from ``calibration.data`` are checked when the job runs), the method's own
    checks, and whether the output target can be published to."""
    spec = load_spec(spec)
    cfg = io or IOConfig()
    base, experts, plan, _, _ = _prepare(spec, cfg, calibration_files, pending_ok=True)
    for ck in (base, *experts):
        ck.close()
    problem = None
    try:
        Publisher(spec.output.uri, cfg, spec.output.overwrite).check_target()
    except MergeError as e:
        problem = e.message
    return Preflight(spec, plan, base, experts, problem)


def merge(spec: MergeSpec | dict, progress: Callable[[ProgressEvent], Any] | None = None, *,
          io: IOConfig | None = None, should_cancel: Callable[[], bool] | None = None,
          calibration_files: dict[str, str] | None = None,
          choose_alpha: Callable[["TaskVector"], float] | None = None) -> MergeResult:
    """Run a merge job end to end. Raises a ``MergeError`` (with ``code``) on any bad input.

    ``calibration_files`` maps an expert name to a statistics file that replaces its
    ``calibration`` entry (how captured statistics reach the engine). ``choose_alpha`` is called
    once every key is merged, with the merged task vector before α (``TaskVector``); the α it
    returns is the one written. It is required when ``params.alpha`` is ``"auto"``.

    On any failure nothing is published at ``output.uri`` and the staging area is removed.
    """
    spec = load_spec(spec)
    if spec.alpha_auto and choose_alpha is None:
        raise SpecError("params.alpha: 'auto' needs an α search over validation data; run the job through the "
                        "service or the `submerge merge` command, which evaluate the merged model", field="params.alpha")
    if spec.searched_params:
        name = spec.searched_params[0]
        raise SpecError(f"params.{name}: 'auto' is chosen on validation data before the merge; run the job through "
                        "the service or the `submerge merge` command, which evaluate the merged model", field=f"params.{name}")
    cfg = io or IOConfig()
    emit = _Progress(progress, should_cancel)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    emit("inspect", 0, 1, message="reading checkpoint headers")
    publisher = Publisher(spec.output.uri, cfg, spec.output.overwrite)
    base = experts = writer = None
    hasher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
    try:
        publisher.check_target()
        base, experts, plan, ctx, method = _prepare(spec, cfg, calibration_files)
        device, dtype = ctx.device, ctx.dtype
        params = method.params
        merged_items = [p for p in plan if p.action == "merge"]
        collector = _collector(spec, params, plan)
        publisher.stage()
        timings["inspect"] = time.perf_counter() - t0
        emit("inspect", 1, 1)

        input_hashes = {ck.label: {name: hasher.submit(lambda loc=loc: sha256_file(loc.local_path(), cfg.cache_dir)) for name, loc in ck.data_files().items()}
                        for ck in [base, *experts]}

        writer = ShardedWriter(publisher.staging, [(p.key, p.out_dtype, p.shape) for p in plan], spec.output.shard_size)
        largest_taus = max((len(experts) * math.prod(p.shape) * dtype.itemsize for p in merged_items), default=0)
        loader = _Loader(base, experts, device, dtype, spec.options.check_finite, largest_taus)
        with torch.no_grad(), heap.unmap_freed_arrays(method.unmap_freed_arrays):
            for p_index in range(method.prepasses):
                t = time.perf_counter()
                for i, item in enumerate(merged_items):
                    emit(f"prepass {p_index + 1}/{method.prepasses}", i, len(merged_items), item.key)
                    method.observe(p_index, loader.load(item, i)[1])
                    loader.release(i)
                method.end_pass(p_index)
                timings[f"prepass{p_index + 1}"] = time.perf_counter() - t

            t = time.perf_counter()
            spill_dir = os.path.join(publisher.staging, ".spill")
            deferred: dict[str, tuple[str, PlanItem, str, float]] = {}
            norms: dict[str, dict[str, float]] = {}
            scaled: dict[str, bool] = {}
            coverage_rows: dict[int, dict] = {}  # plan index -> manifest row (jobs finish in any order)

            def compute(item: PlanItem, base_t: torch.Tensor, job: TensorJob):
                merged = method.merge(job)
                if not all_finite(merged):
                    raise MergeError(f"method {spec.method!r} produced NaN/Inf for tensor {item.key!r}", code="numerical_failure")
                if collector is not None:
                    collector.observe(job, merged)
                coefficient = method.coefficient(job)
                scaled[item.key] = method.alpha_scaled(job)
                group = method.rescale_group(job)
                if group is None and choose_alpha is not None:
                    group = ""  # every key waits on disk until α is chosen
                if group is None:
                    return _finish(base_t, merged, coefficient, item).cpu(), coefficient, group, None
                return merged.cpu(), coefficient, group, float(torch.linalg.vector_norm(merged))

            def store(i: int, item: PlanItem, result) -> None:
                tensor, coefficient, group, norm = result
                if group is None:
                    writer.write(item.key, tensor)
                else:  # keep τ on disk until every layer of its group is known
                    os.makedirs(spill_dir, exist_ok=True)
                    path = os.path.join(spill_dir, f"{i}.pt")
                    torch.save(tensor, path)
                    if group:
                        norms.setdefault(group, {})[item.key] = norm
                    deferred[item.key] = (path, item, group, coefficient)
                coverage_rows[i] = _coverage(item, "merged", coefficient=coefficient, group=group or None)
                loader.release(i)  # the result is stored: the job's task vectors are not read again

            # The main thread reads inputs in plan order; a small pool merges several tensors at
            # once, each single-threaded. What may be in flight is bounded in bytes (`workers` times
            # the largest job), not in jobs: a count would let a bias queued behind a large matrix
            # idle a worker, and the count of large matrices is what bounds memory. Results are
            # stored as jobs finish (the writer takes tensors in any order), not in plan order: a
            # finished job waiting behind a longer one would hold the window shut while a worker
            # idles (ESM: the 12 s c_fc layer next to the 6 s c_proj one, 20 % of the time lost).
            job_bytes = {item.key: _job_bytes(item, len(experts), dtype) for item in merged_items}
            largest_job = max(job_bytes.values(), default=0)
            workers = spec.options.workers or default_worker_count(largest_job)
            if device.type != "cpu":
                workers = 1  # one stream of kernels; the GPU parallelises within a tensor
            # OpenMP's thread count is per OS thread: a pool thread that does not set its own runs
            # every op on all cores (2 workers × 2 OpenMP threads on 2 cores: 1.4× slower, measured).
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge",
                                                         initializer=torch.set_num_threads, initargs=(1,)) if workers > 1 else None
            in_flight_budget = workers * largest_job
            pending: dict[concurrent.futures.Future, tuple[int, PlanItem]] = {}

            def store_finished(wait: bool) -> None:
                """Store every finished job (with ``wait``, after at least one has finished)."""
                done, _ = concurrent.futures.wait(list(pending), timeout=None if wait else 0,
                                                  return_when=concurrent.futures.FIRST_COMPLETED)
                for fut in sorted(done, key=lambda f: pending[f][0]):
                    j, it = pending.pop(fut)
                    store(j, it, fut.result())

            def in_flight() -> int:
                return sum(job_bytes[it.key] for _, it in pending.values())

            prev_threads = torch.get_num_threads()
            if pool is not None:
                torch.set_num_threads(1)
            try:
                for i, item in enumerate(plan):
                    emit("merge", i, len(plan), item.key)
                    if item.action == "copy":
                        writer.write(item.key, base.read(item.key))
                        coverage_rows[i] = _coverage(item, "copied")
                        continue
                    base_t, job = loader.load(item, i)
                    if pool is None:
                        store(i, item, compute(item, base_t, job))
                        continue
                    pending[pool.submit(compute, item, base_t, job)] = (i, item)
                    del base_t, job
                    store_finished(wait=False)
                    while pending and in_flight() >= in_flight_budget:
                        store_finished(wait=True)
                while pending:
                    store_finished(wait=True)
            finally:
                if pool is not None:
                    for fut in pending:
                        fut.cancel()
                    pool.shutdown(wait=True)
                    torch.set_num_threads(prev_threads)
            emit("merge", len(plan), len(plan))
            timings["merge"] = time.perf_counter() - t
            # Jobs finish in any order: what depends on order goes back to plan order, so the
            # manifest and the group means (floating-point sums) are the same from run to run.
            position = {item.key: i for i, item in enumerate(plan)}
            coverage = [coverage_rows[i] for i in sorted(coverage_rows)]
            deferred = dict(sorted(deferred.items(), key=lambda kv: position[kv[0]]))
            norms = {g: dict(sorted(n.items(), key=lambda kv: position[kv[0]])) for g, n in sorted(norms.items())}

            if deferred:
                t = time.perf_counter()
                factors = method.group_factors(norms)
                if collector is not None:
                    collector.rescale(factors)
                if choose_alpha is not None:
                    emit("alpha search", 0, 1, message="choosing α on validation data")
                    alpha = float(choose_alpha(TaskVector(base, deferred, factors, scaled, device, dtype)))
                    if not math.isfinite(alpha):
                        raise MergeError(f"the α search returned {alpha}", code="evaluation_failed")
                    params = params.model_copy(update={"alpha": alpha})
                    method.params = params
                    deferred = {key: (path, item, group, alpha if scaled[key] else 1.0)
                                for key, (path, item, group, _) in deferred.items()}
                    for row in coverage:
                        if row["key"] in deferred:
                            row["coefficient"] = deferred[row["key"]][3]
                    emit("alpha search", 1, 1)
                    timings["alpha_search"] = time.perf_counter() - t
                    t = time.perf_counter()
                for j, (key, (path, item, group, coefficient)) in enumerate(deferred.items()):
                    emit("rescale", j, len(deferred), key)
                    merged = torch.load(path, weights_only=True).to(device)
                    base_t = loader._read(base, key).to(device, dtype)
                    if item.role.transposed and len(item.shape) == 2:
                        base_t = base_t.mT
                    writer.write(key, _finish(base_t, merged * factors.get(key, 1.0), coefficient, item))
                    os.unlink(path)
                os.rmdir(spill_dir)
                timings["rescale"] = time.perf_counter() - t

        t = time.perf_counter()
        names = writer.close()
        diagnostics = None
        if collector is not None:
            emit("diagnostics", 0, 1, message="spectra, SAR, STI, HO-GSVD")
            diagnostics = collector.finish()
            diagnostics["params"] = params.model_dump(mode="json", by_alias=True)  # with the α actually used
            emit("diagnostics", 1, 1)
        emit("finalize", 0, 1, message="hashing and writing manifest")
        if collector is not None:
            # The artifact is a pure function of the inputs (like the model); what the analysis cost
            # goes to merge.json's timings instead.
            cost = diagnostics.pop("cost_s", {})
            timings["diagnostics_cpu"] = float(cost.get("total", 0.0))
            with open(os.path.join(publisher.staging, "diagnostics.json"), "w") as f:
                json.dump(diagnostics, f, indent=1)
            names.append("diagnostics.json")
            diagnostics["cost_s"] = cost
        for name, loc in base.side_files.items():
            with open(os.path.join(publisher.staging, name), "wb") as f:
                f.write(loc.read_all())
            names.append(name)
        files = {n: {"sha256": writer.sha256.get(n) or sha256_file(os.path.join(publisher.staging, n), persist=False),
                     "size": os.path.getsize(os.path.join(publisher.staging, n))} for n in names}
        inputs = []
        for ck, ref in zip([base, *experts], [spec.base, *spec.experts]):
            inputs.append({"name": ck.label, "uri": redact_uri(ref.uri), "revision": ref.revision, "format": ck.format,
                           "files": {n: f.result() for n, f in input_hashes[ck.label].items()}})
        manifest = {
            "format": "submerge.merge/1",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "software": {"submerge": __version__, "torch": torch.__version__},
            "method": spec.method,
            "params": params.model_dump(mode="json", by_alias=True),
            "spec": _redacted_spec(spec),
            "device": str(device), "compute_dtype": spec.options.compute_dtype,
            "inputs": inputs,
            "files": files,
            "coverage": {"total": len(plan), "merged": sum(1 for c in coverage if c["action"] == "merged"),
                         "copied": sum(1 for c in coverage if c["action"] == "copied")},
            "tensors": coverage,
            "notes": ctx.notes,
        }
        with open(os.path.join(publisher.staging, "README.md"), "w") as f:
            f.write(model_card(manifest))
        files["README.md"] = {"sha256": sha256_file(os.path.join(publisher.staging, "README.md"), persist=False),
                              "size": os.path.getsize(os.path.join(publisher.staging, "README.md"))}
        timings["finalize"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        manifest["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        with open(os.path.join(publisher.staging, Publisher.MARKER), "w") as f:
            json.dump(manifest, f, indent=1)
        emit("publish", 0, 1)
        publisher.publish([*files, Publisher.MARKER])
        emit("done", 1, 1)
        return MergeResult(spec.output.uri, files, manifest, timings, diagnostics)
    except BaseException as e:
        publisher.abort()
        if isinstance(e, OSError) and not isinstance(e, MergeError):
            raise OutputError(f"I/O error while merging: {e}") from e
        raise
    finally:
        if writer is not None:
            writer.abort()  # closed already after a good merge; after a failure, stops hashing and closes the shards
        hasher.shutdown(wait=False, cancel_futures=True)
        for ck in [base, *(experts or [])]:
            if ck is not None:
                ck.close()


def _collector(spec: MergeSpec, params, plan: list[PlanItem]):
    """The diagnostics collector for this job (None when diagnostics are off)."""
    if spec.options.diagnostics == "off":
        return None
    from merging.diagnostics.collector import DiagnosticsCollector
    matrix_keys = [p.key for p in plan if p.action == "merge" and len(p.shape) == 2 and p.role.role not in NON_MATRIX_2D_ROLES]
    full = spec.options.diagnostics == "full"
    return DiagnosticsCollector(spec.method, params.model_dump(mode="json", by_alias=True), spec.expert_names(),
                                max_svd_layers=len(matrix_keys) if full else 24, plan_keys=matrix_keys,
                                svd_fraction=1.0 if full else 0.08)  # 8%: ViT-B/16 → 4 layers, one per role


def _redacted_spec(spec: MergeSpec) -> dict:
    """The spec as recorded in merge.json and the model card: URIs without credentials or signatures."""
    def walk(obj):
        if isinstance(obj, dict):
            return {k: (redact_uri(v) if k in ("uri", "callback_url") and isinstance(v, str) else walk(v)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        return obj
    return walk(spec.model_dump(mode="json", by_alias=True))


def _coverage(item: PlanItem, action: str, **extra) -> dict:
    row = {"key": item.key, "shape": list(item.shape), "dtype": str(item.out_dtype).removeprefix("torch."),
           "role": item.role.role.value, "transposed": item.role.transposed, "role_source": item.role.source, "action": action}
    if item.reason:
        row["reason"] = item.reason
    row.update({k: v for k, v in extra.items() if v is not None})
    return row


def model_card(manifest: dict) -> str:
    lines = [
        "---", "tags: [merge, submerge]", "---", "",
        f"# Merged model ({manifest['method']})", "",
        f"Merged with submerge {manifest['software']['submerge']} (torch {manifest['software']['torch']}) on {manifest['created']}.", "",
        "## Method", "", f"`{manifest['method']}` with parameters:", "", "```json", json.dumps(manifest["params"], indent=2), "```", "",
        "## Inputs", "", "| role | URI | file | sha256 |", "|---|---|---|---|",
    ]
    for inp in manifest["inputs"]:
        for name, digest in inp["files"].items():
            lines.append(f"| {inp['name']} | `{inp['uri']}` | {name} | `{digest}` |")
    cov = manifest["coverage"]
    lines += ["", "## Coverage", "", f"{cov['total']} tensors: {cov['merged']} merged, {cov['copied']} copied from the base. "
              "The full per-tensor list (with the layer role each tensor got) is in `merge.json`.", ""]
    return "\n".join(lines)

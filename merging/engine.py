"""A merge job end to end, in the order it runs: plan (``merging.plan``), pre-passes and the merge
pass (tensors streamed through ``merging.stream``), the keys held back for a rescale or an α
search, then the card (``merging.card``) and the atomic publish (``merging.io.writer``)."""
from __future__ import annotations

import concurrent.futures
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from merging import heap
from merging.card import coverage_row, hash_inputs, stage_card, write_manifest
from merging.diagnostics import DiagnosticsCollector
from merging.errors import MergeError, OutputError, SpecError
from merging.io.sources import IOConfig
from merging.io.writer import Publisher, ShardedWriter
from merging.linalg import all_finite
from merging.methods.base import MergeMethod, TensorJob
from merging.plan import PlanItem, PreparedMerge, prepare
from merging.progress import ProgressCallback, ProgressEmitter
from merging.roles import NON_MATRIX_2D_ROLES
from merging.spec import MergeSpec, load_spec
from merging.stream import MergePool, Spill, TaskVector, TaskVectorLoader, default_worker_count, job_bytes, merged_weight


@dataclass
class MergeResult:
    output_uri: str
    files: dict[str, dict[str, Any]]
    manifest: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    diagnostics: dict[str, Any] | None = None  # the data-free diagnostics report (also in diagnostics.json)


def merge(spec: MergeSpec | dict, progress: ProgressCallback | None = None, *,
          io: IOConfig | None = None, should_cancel: Callable[[], bool] | None = None,
          calibration_files: dict[str, str] | None = None,
          choose_alpha: Callable[[TaskVector], float] | None = None) -> MergeResult:
    """Run a merge job end to end. Raises a ``MergeError`` (with ``code``) on any bad input.

    ``calibration_files`` maps an expert name to a statistics file that replaces its
    ``calibration`` entry (how captured statistics reach the engine). ``choose_alpha`` is called
    once every key is merged, with the merged task vector before α (``TaskVector``); the α it
    returns is the one written. It is required when ``params.alpha`` is ``"auto"``.

    On any failure nothing is published at ``output.uri`` and the staging area is removed.
    """
    spec = load_spec(spec)
    _refuse_searches_left_to_the_caller(spec, choose_alpha)
    cfg = io or IOConfig()
    emit = ProgressEmitter(progress, should_cancel)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    emit("inspect", 0, 1, message="reading checkpoint headers")
    publisher = Publisher(spec.output.uri, cfg, spec.output.overwrite)
    prepared: PreparedMerge | None = None
    writer = None
    hasher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
    try:
        publisher.check_target()
        prepared = prepare(spec, cfg, calibration_files)
        method, ctx = prepared.method, prepared.method.ctx
        collector = _diagnostics_collector(spec, method, prepared.plan)
        publisher.stage()
        timings["inspect"] = time.perf_counter() - t0
        emit("inspect", 1, 1)

        input_hashes = hash_inputs(hasher, [prepared.base, *prepared.experts], cfg.cache_dir)
        writer = ShardedWriter(publisher.staging, [(p.key, p.out_dtype, p.shape) for p in prepared.plan], spec.output.shard_size)
        largest_taus = max((len(prepared.experts) * math.prod(p.shape) * ctx.dtype.itemsize for p in prepared.merged_items), default=0)
        loader = TaskVectorLoader(prepared.base, prepared.experts, ctx.device, ctx.dtype, spec.options.check_finite, largest_taus)
        with torch.no_grad(), heap.unmap_freed_arrays(method.unmap_freed_arrays):
            _prepasses(prepared, loader, emit, timings)
            t = time.perf_counter()
            spill = Spill(os.path.join(publisher.staging, ".spill"))
            merge_pass = _MergePass(prepared, collector, writer, loader, spill, hold_every_key=choose_alpha is not None)
            coverage = merge_pass.run(spec.options.workers, emit)
            timings["merge"] = time.perf_counter() - t
            if spill.keys:
                _finish_held_back(prepared, spill, coverage, collector, writer, loader, choose_alpha, emit, timings)

        t = time.perf_counter()
        shards = {name: writer.sha256.get(name) for name in writer.close()}
        diagnostics = _finish_diagnostics(collector, method, emit)
        emit("finalize", 0, 1, message="hashing and writing manifest")
        files, manifest = stage_card(publisher.staging, spec, prepared, shards, input_hashes, coverage, diagnostics, timings)
        timings["finalize"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        manifest["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        write_manifest(publisher.staging, manifest)
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
        if prepared is not None:
            prepared.close()


def _refuse_searches_left_to_the_caller(spec: MergeSpec, choose_alpha: Callable | None) -> None:
    """Parameters set to "auto" are chosen on validation data, which merge() alone cannot score."""
    if spec.alpha_auto and choose_alpha is None:
        raise SpecError("params.alpha: 'auto' needs an α search over validation data; run the job through the "
                        "service or the `submerge merge` command, which evaluate the merged model", field="params.alpha")
    if spec.searched_params:
        name = spec.searched_params[0]
        raise SpecError(f"params.{name}: 'auto' is chosen on validation data before the merge; run the job through "
                        "the service or the `submerge merge` command, which evaluate the merged model", field=f"params.{name}")


def _diagnostics_collector(spec: MergeSpec, method: MergeMethod, plan: list[PlanItem]) -> DiagnosticsCollector | None:
    """The diagnostics collector for this job (None when diagnostics are off)."""
    if spec.options.diagnostics == "off":
        return None
    matrix_keys = [p.key for p in plan if p.action == "merge" and len(p.shape) == 2 and p.role.role not in NON_MATRIX_2D_ROLES]
    full = spec.options.diagnostics == "full"
    return DiagnosticsCollector(spec.method, method.params.model_dump(mode="json", by_alias=True), spec.expert_names(),
                                max_svd_layers=len(matrix_keys) if full else 24, plan_keys=matrix_keys,
                                svd_fraction=1.0 if full else 0.08)  # 8%: ViT-B/16 → 4 layers, one per role


def _finish_diagnostics(collector: DiagnosticsCollector | None, method: MergeMethod,
                        emit: ProgressEmitter) -> dict[str, Any] | None:
    """The diagnostics report (spectra and the rest are computed now), with the α actually used."""
    if collector is None:
        return None
    emit("diagnostics", 0, 1, message="spectra, SAR, STI, HO-GSVD")
    diagnostics = collector.finish()
    diagnostics["params"] = method.params.model_dump(mode="json", by_alias=True)
    emit("diagnostics", 1, 1)
    return diagnostics


def _prepasses(prepared: PreparedMerge, loader: TaskVectorLoader, emit: ProgressEmitter, timings: dict[str, float]) -> None:
    """Stream every merged key through the method's ``observe`` once per pre-pass (TIES's global threshold)."""
    method, items = prepared.method, prepared.merged_items
    for p_index in range(method.prepasses):
        t = time.perf_counter()
        for i, item in enumerate(items):
            emit(f"prepass {p_index + 1}/{method.prepasses}", i, len(items), item.key)
            method.observe(p_index, loader.load(item, i)[1])
            loader.release(i)
        method.end_pass(p_index)
        timings[f"prepass{p_index + 1}"] = time.perf_counter() - t


@dataclass
class _Merged:
    """One merged key, as a worker hands it to the main thread."""
    tensor: torch.Tensor  # θ0 + c·τ in checkpoint layout, or τ itself (on the CPU) when held back
    coefficient: float
    group: str | None  # None: written now; else held back on disk ("" when only for the α search)
    norm: float | None  # ‖τ‖, for the group's rescale
    alpha_scaled: bool


class _MergePass:
    """Every key of the plan in order: copied, or merged by the method on a worker (``compute``)
    and then written or held back on disk by the main thread (``store``)."""

    def __init__(self, prepared: PreparedMerge, collector: DiagnosticsCollector | None, writer: ShardedWriter,
                 loader: TaskVectorLoader, spill: Spill, hold_every_key: bool):
        self.prepared, self.method, self.collector = prepared, prepared.method, collector
        self.writer, self.loader, self.spill = writer, loader, spill
        self.hold_every_key = hold_every_key  # an α search follows: every key waits on disk until α is chosen
        self.coverage: dict[int, dict] = {}  # plan index -> manifest row (jobs finish in any order)

    def run(self, workers: int | None, emit: ProgressEmitter) -> list[dict]:
        """Merge the plan; the coverage rows in plan order."""
        plan, ctx = self.prepared.plan, self.method.ctx
        sizes = {item.key: job_bytes(item, len(self.prepared.experts), ctx.dtype) for item in self.prepared.merged_items}
        largest_job = max(sizes.values(), default=0)
        workers = workers or default_worker_count(largest_job)
        if ctx.device.type != "cpu":
            workers = 1  # one stream of kernels; the GPU parallelises within a tensor
        with MergePool(workers, workers * largest_job, self.store) as pool:
            for i, item in enumerate(plan):
                emit("merge", i, len(plan), item.key)
                if item.action == "copy":
                    self.writer.write(item.key, self.prepared.base.read(item.key))
                    self.coverage[i] = coverage_row(item, "copied")
                    continue
                base_t, job = self.loader.load(item, i)
                pool.submit(i, sizes[item.key], self.compute, item, base_t, job)
                del base_t, job  # the job alone holds its inputs: freed as soon as it finishes
                pool.make_room()
            pool.drain()
        emit("merge", len(plan), len(plan))
        # Jobs finish in any order: what depends on order goes back to plan order, so the
        # manifest and the group means (floating-point sums) are the same from run to run.
        self.spill.put_in_order({item.key: i for i, item in enumerate(plan)})
        return [self.coverage[i] for i in sorted(self.coverage)]

    def compute(self, item: PlanItem, base_t: torch.Tensor, job: TensorJob) -> _Merged:
        merged = self.method.merge(job)
        if not all_finite(merged):
            raise MergeError(f"method {self.method.name!r} produced NaN/Inf for tensor {item.key!r}", code="numerical_failure")
        if self.collector is not None:
            self.collector.observe(job, merged)
        coefficient = self.method.coefficient(job)
        alpha_scaled = self.method.alpha_scaled(job)
        group = self.method.rescale_group(job)
        if group is None and self.hold_every_key:
            group = ""
        if group is None:
            return _Merged(merged_weight(base_t, merged, coefficient, item).cpu(), coefficient, None, None, alpha_scaled)
        return _Merged(merged.cpu(), coefficient, group, float(torch.linalg.vector_norm(merged)), alpha_scaled)

    def store(self, index: int, result: _Merged) -> None:
        item = self.prepared.plan[index]
        if result.group is None:
            self.writer.write(item.key, result.tensor)
        else:  # keep τ on disk until every layer of its group is known
            self.spill.put(index, item, result.tensor, result.group, result.coefficient, result.norm, result.alpha_scaled)
        self.coverage[index] = coverage_row(item, "merged", coefficient=result.coefficient, group=result.group or None)
        self.loader.release(index)  # the result is stored: the job's task vectors are not read again


def _finish_held_back(prepared: PreparedMerge, spill: Spill, coverage: list[dict], collector: DiagnosticsCollector | None,
                      writer: ShardedWriter, loader: TaskVectorLoader, choose_alpha: Callable[[TaskVector], float] | None,
                      emit: ProgressEmitter, timings: dict[str, float]) -> None:
    """The keys held back on disk: their group factors (ESM's inter-layer scaling), α when it is
    chosen on validation data, then θ0 + c·factor·τ written for each."""
    method = prepared.method
    t = time.perf_counter()
    factors = method.group_factors(spill.norms)
    if collector is not None:
        collector.rescale(factors)
    if choose_alpha is not None:
        emit("alpha search", 0, 1, message="choosing α on validation data")
        alpha = float(choose_alpha(TaskVector(prepared.base, spill, factors)))
        if not math.isfinite(alpha):
            raise MergeError(f"the α search returned {alpha}", code="evaluation_failed")
        method.params = method.params.model_copy(update={"alpha": alpha})
        spill.set_alpha(alpha)
        for row in coverage:
            if row["key"] in spill.keys:
                row["coefficient"] = spill.keys[row["key"]].coefficient
        emit("alpha search", 1, 1)
        timings["alpha_search"] = time.perf_counter() - t
        t = time.perf_counter()
    for j, (key, held) in enumerate(spill.keys.items()):
        emit("rescale", j, len(spill.keys), key)
        tau = spill.load(key).to(method.ctx.device)
        writer.write(key, merged_weight(loader.load_base(held.item), tau * factors.get(key, 1.0), held.coefficient, held.item))
        spill.remove(key)
    spill.close()
    timings["rescale"] = time.perf_counter() - t



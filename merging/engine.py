"""A merge job end to end, in the order it runs: plan (``merging.plan``), pre-passes and the merge
pass (tensors streamed through ``merging.stream``), the keys held back for a rescale or an α
search, then the card (``merging.card``) and the atomic publish (``merging.io.writer``)."""
from __future__ import annotations

import concurrent.futures
import math
import os
import time
import traceback
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
from merging.memory import copy_blocks
from merging.methods.base import MergeMethod, RowBlock, TensorJob
from merging.plan import PlanItem, PreparedMerge, prepare
from merging.progress import ProgressCallback, ProgressEmitter
from merging.spec import MergeSpec, load_spec
from merging.stream import MergePool, ReadInputs, Spill, TaskVector, TaskVectorLoader, merged_weight


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
          choose_alpha: Callable[[TaskVector], float] | None = None, memory_budget: int | None = None) -> MergeResult:
    """Run a merge job end to end. Raises a ``MergeError`` (with ``code``) on any bad input.

    ``calibration_files`` maps an expert name to a statistics file that replaces its
    ``calibration`` entry (how captured statistics reach the engine). ``choose_alpha`` is called
    once every key is merged, with the merged task vector before α (``TaskVector``); the α it
    returns is the one written. It is required when ``params.alpha`` is ``"auto"``.
    ``memory_budget`` caps ``options.memory_budget`` (the worker's own budget; ``merging.memory``).

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
        prepared = prepare(spec, cfg, calibration_files, memory_budget=memory_budget)
        method, ctx = prepared.method, prepared.method.ctx
        collector = _diagnostics_collector(spec, prepared)
        publisher.stage()
        timings["inspect"] = time.perf_counter() - t0
        emit("inspect", 1, 1)

        input_hashes = hash_inputs(hasher, [prepared.base, *prepared.experts], cfg.cache_dir)
        writer = ShardedWriter(publisher.staging, [(p.key, p.out_dtype, p.out_shape) for p in prepared.plan], spec.output.shard_size)
        largest_taus = prepared.memory.largest_task_vectors(prepared.plan, len(prepared.experts), ctx.dtype)
        loader = TaskVectorLoader(prepared.base, prepared.experts, ctx.device, ctx.dtype, spec.options.check_finite, largest_taus,
                                  prepared.memory.tile_bytes)
        # A merge in row blocks is one that memory bounds: its freed block arrays go back to the system.
        blocks = prepared.memory.smallest_block_array(prepared.plan, ctx.dtype)
        with torch.no_grad(), heap.unmap_freed_arrays(method.unmap_freed_arrays or blocks is not None,
                                                      blocks or heap.WHILE_ACTIVE):
            _prepasses(prepared, loader, emit, timings)
            t = time.perf_counter()
            spill = Spill(os.path.join(publisher.staging, ".spill"))
            merge_pass = _MergePass(prepared, collector, writer, loader, spill, hold_every_key=choose_alpha is not None)
            coverage = merge_pass.run(emit)
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
        _release_frames(e)
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


def _release_frames(error: BaseException) -> None:
    """Clear the locals of the finished frames that ``error`` (and the errors it chains) carries:
    they hold the job's inputs, mapped from the checkpoint files (``Checkpoint.view``), whose
    mappings and file descriptors would otherwise last as long as the caller keeps the error."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def _refuse_searches_left_to_the_caller(spec: MergeSpec, choose_alpha: Callable | None) -> None:
    """Parameters set to "auto" are chosen on validation data, which merge() alone cannot score."""
    if spec.alpha_auto and choose_alpha is None:
        raise SpecError("params.alpha: 'auto' needs an α search over validation data; run the job through the "
                        "service or the `submerge merge` command, which evaluate the merged model", field="params.alpha")
    if spec.searched_params:
        name = spec.searched_params[0]
        raise SpecError(f"params.{name}: 'auto' is chosen on validation data before the merge; run the job through "
                        "the service or the `submerge merge` command, which evaluate the merged model", field=f"params.{name}")


def _diagnostics_collector(spec: MergeSpec, prepared: PreparedMerge) -> DiagnosticsCollector | None:
    """The diagnostics collector for this job (None when diagnostics are off)."""
    sample = prepared.diagnostics
    if sample is None:
        return None
    return DiagnosticsCollector(spec.method, prepared.method.params.model_dump(mode="json", by_alias=True), spec.expert_names(),
                                max_svd_layers=sample.max_svd_layers, plan_keys=sample.plan_keys,
                                svd_fraction=sample.svd_fraction, min_svd_layers=sample.min_svd_layers)


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
    method, plan, blocks = prepared.method, prepared.plan, prepared.memory.blocks
    for p_index in range(method.prepasses):
        t = time.perf_counter()
        for i, item in enumerate(plan):
            if item.action != "merge":
                continue
            emit(f"prepass {p_index + 1}/{method.prepasses}", i, len(plan), item.key)
            for block in blocks.get(i, [None]):
                if i in prepared.memory.tiled:  # what a method observes adds up over rows: tiles will do
                    for _, tile in loader.tiles(loader.read(item, i, block, tiled=True)):
                        method.observe(p_index, tile)
                    continue
                method.observe(p_index, loader.load(item, i, block)[1])
                loader.release(i, block)
        method.end_pass(p_index)
        timings[f"prepass{p_index + 1}"] = time.perf_counter() - t


@dataclass
class _Merged:
    """One merged key (or row block of one), as a worker hands it to the main thread."""
    tensor: torch.Tensor  # θ0 + c·τ in checkpoint layout, or τ itself (on the CPU) when held back
    coefficient: float
    group: str | None  # None: written now; else held back on disk ("" when only for the α search)
    norm: float | None  # ‖τ‖ (of these rows), for the group's rescale
    alpha_scaled: bool
    block: RowBlock | None


class _MergePass:
    """Every key of the plan in order: copied, or merged by the method on a worker (``compute``),
    whole or in the row blocks of the memory plan, and then written or held back on disk by the
    main thread (``store``)."""

    def __init__(self, prepared: PreparedMerge, collector: DiagnosticsCollector | None, writer: ShardedWriter,
                 loader: TaskVectorLoader, spill: Spill, hold_every_key: bool):
        self.prepared, self.method, self.collector = prepared, prepared.method, collector
        self.writer, self.loader, self.spill = writer, loader, spill
        self.hold_every_key = hold_every_key  # an α search follows: every key waits on disk until α is chosen
        self.coverage: dict[int, dict] = {}  # plan index -> manifest row (jobs finish in any order)
        self._blocks_left: dict[int, int] = {}  # plan index -> row blocks not stored yet

    def run(self, emit: ProgressEmitter) -> list[dict]:
        """Merge the plan; the coverage rows in plan order."""
        plan, memory = self.prepared.plan, self.prepared.memory
        with MergePool(memory.workers, memory.window, self.store) as pool:
            for i, item in enumerate(plan):
                emit("merge", i, len(plan), item.key)
                if item.action == "copy":
                    self._copy(item)
                    self.coverage[i] = coverage_row(item, "copied")
                    continue
                blocks = memory.blocks.get(i)
                self._blocks_left[i] = len(blocks) if blocks else 1
                for block in blocks or [None]:
                    pool.make_room(memory.peaks[i])
                    inputs = self.loader.read(item, i, block, tiled=i in memory.tiled)  # reading only: the casts run on the worker
                    draws = self.method.draw(item.key, inputs.task_shape, len(self.prepared.experts), block)  # in order, here
                    pool.submit((i, block.start if block else 0), memory.peaks[i], self.compute, inputs, draws)
                    del inputs  # the job alone holds its inputs: freed as soon as it finishes
                if item.appended:
                    self._append_rows(item)
            pool.drain()
        emit("merge", len(plan), len(plan))
        # Jobs finish in any order: what depends on order goes back to plan order, so the
        # manifest and the group means (floating-point sums) are the same from run to run.
        self.spill.put_in_order({item.key: i for i, item in enumerate(plan)})
        return [self.coverage[i] for i in sorted(self.coverage)]

    def _copy(self, item: PlanItem) -> None:
        """A key copied from the base: through memory in row blocks when it is large."""
        base = self.prepared.base
        blocks = copy_blocks(item.shape, item.in_dtype.itemsize, self.prepared.memory.budget)
        if blocks is None:
            self.writer.write(item.key, base.read(item.key))
            return
        for block in blocks:
            self.writer.write(item.key, base.read(item.key, rows=(block.start, block.stop)), start_row=block.start)

    def _append_rows(self, item: PlanItem) -> None:
        """options.vocab 'union': after the merged rows, one row per added token, the mean of that
        row over the experts that added the token (their weights, not task vectors: the base has none)."""
        experts, dtype = self.prepared.experts, self.method.ctx.dtype
        rows = [torch.stack([experts[e].read_meta(meta).to(dtype) for e, meta in pairs]).mean(0) for pairs in item.appended]
        self.writer.write(item.key, torch.cat(rows), start_row=item.shape[0])

    def compute(self, inputs: ReadInputs, draws: Any) -> _Merged:
        if inputs.taus is None:
            return self._compute_tiles(inputs, draws)
        item = inputs.item
        base_t, job = self.loader.prepare(inputs)
        del inputs
        job.draws = draws
        merged = self.method.merge(job)
        if not all_finite(merged):
            where = "" if job.block is None else f" (rows {job.block.start}..{job.block.stop})"
            raise MergeError(f"method {self.method.name!r} produced NaN/Inf for tensor {item.key!r}{where}", code="numerical_failure")
        if self.collector is not None:
            self.collector.observe(job, merged)
        coefficient = self.method.coefficient(job)
        alpha_scaled = self.method.alpha_scaled(job)
        group = self.method.rescale_group(job)
        if group is None and self.hold_every_key:
            group = ""
        if group is None:  # cast for writing here, on the worker: the reading thread only writes bytes
            out = merged_weight(base_t, merged, coefficient, item, job.block).to(device="cpu", dtype=item.out_dtype)
            return _Merged(out, coefficient, None, None, alpha_scaled, job.block)
        return _Merged(merged.cpu(), coefficient, group, float(torch.linalg.vector_norm(merged)), alpha_scaled, job.block)

    def _compute_tiles(self, inputs: ReadInputs, draws: Any) -> _Merged:
        """``compute`` for a job read for tiles (``TaskVectorLoader.tiles``): each tile is merged,
        checked, observed and written into the job's result, θ0 + c·τ in the output dtype (or τ in
        the compute dtype when held back), as the whole job would be."""
        item, block = inputs.item, inputs.block
        offset = 0 if block is None else block.start
        out: torch.Tensor | None = None
        for base_t, job in self.loader.tiles(inputs, draws):
            merged = self.method.merge(job)
            if not all_finite(merged):
                raise MergeError(f"method {self.method.name!r} produced NaN/Inf for tensor {item.key!r} "
                                 f"(rows {job.block.start}..{job.block.stop})", code="numerical_failure")
            if self.collector is not None:
                self.collector.observe(job, merged)
            if out is None:  # what the job's tiles have in common, from its first
                coefficient, alpha_scaled = self.method.coefficient(job), self.method.alpha_scaled(job)
                group = self.method.rescale_group(job)
                if group is None and self.hold_every_key:
                    group = ""
                out = torch.empty(inputs.base.shape, dtype=item.out_dtype if group is None else merged.dtype)
            rows = slice(job.block.start - offset, job.block.stop - offset)
            out[rows].copy_(merged if group is not None else merged_weight(base_t, merged, coefficient, item, job.block))
        del inputs
        norm = None if group is None else float(torch.linalg.vector_norm(out))
        return _Merged(out, coefficient, group, norm, alpha_scaled, block)

    def store(self, position: tuple[int, int], result: _Merged) -> None:
        index = position[0]
        item = self.prepared.plan[index]
        if result.group is None:
            self.writer.write(item.key, result.tensor, start_row=_first_row(item, result.block))
        else:  # keep τ on disk until every layer of its group is known
            self.spill.put(index, item, result.tensor, result.group, result.coefficient, result.norm, result.alpha_scaled,
                           result.block)
        self.loader.release(index, result.block)  # the result is stored: the job's task vectors are not read again
        self._blocks_left[index] -= 1
        if not self._blocks_left[index]:
            blocks = self.prepared.memory.blocks.get(index)
            self.coverage[index] = coverage_row(item, "merged", coefficient=result.coefficient, group=result.group or None,
                                                row_blocks=len(blocks) if blocks else None)


def _first_row(item: PlanItem, block: RowBlock | None) -> int | None:
    """Where a merged result goes in its output tensor: its block's first row; 0 when rows are
    appended after the merged ones (options.vocab 'union'); None for the whole tensor."""
    if block is not None:
        return block.start
    return 0 if item.appended else None


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
        factor = factors.get(key, 1.0)
        if held.blocks is None:
            tau = spill.load(key).to(method.ctx.device)
            writer.write(key, merged_weight(loader.load_base(held.item), tau * factor, held.coefficient, held.item),
                         start_row=_first_row(held.item, None))
        else:  # held back in row blocks: written back the same way
            for block in held.blocks:
                tau = spill.load_block(key, block).to(method.ctx.device)
                base = loader.load_base_rows(held.item, block)
                writer.write(key, merged_weight(base, tau * factor, held.coefficient, held.item, block), start_row=block.start)
        spill.remove(key)
    spill.close()
    timings["rescale"] = time.perf_counter() - t



"""Before any tensor is read: open the checkpoints' headers, decide what happens to each tensor
(the plan), and make every check a merge makes up front. ``preflight`` is that step alone, with
no side effects (``submerge validate``, the service's ``:validate``)."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch

from merging import vocab
from merging.calibration import open_calibration
from merging.cost import estimate_wall
from merging.diagnostics.collector import spectral_sample
from merging.errors import IncompatibleCheckpointsError, InputError, MergeError, SpecError
from merging.io.checkpoint import Checkpoint, open_checkpoint
from merging.io.safetensors_format import TensorMeta, rows_of
from merging.io.sources import IOConfig
from merging.io.writer import Publisher
from merging.memory import MemoryPlan, effective_budget, plan_memory, worker_count
from merging.methods import get_method
from merging.methods.base import MergeContext, MergeMethod
from merging.roles import NON_MATRIX_2D_ROLES, Role, RoleInfo, resolve_role
from merging.spec import MergeSpec, load_spec
from merging.tied_heads import reconcile_tied_heads

# The spec's dtype names (output.dtype, options.compute_dtype).
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class PlanItem:
    key: str
    role: RoleInfo
    shape: tuple[int, ...]
    in_dtype: torch.dtype
    out_dtype: torch.dtype
    action: str  # "merge" or "copy"
    reason: str | None = None  # why a key is copied
    note: str | None = None  # what was reconciled between base and experts (tied heads, added tokens)
    # options.vocab 'union': the rows appended after the merged ones, one per added token: the
    # (expert index, metadata of that expert's row) pairs whose mean it is.
    appended: tuple[tuple[tuple[int, TensorMeta], ...], ...] = ()

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The shape written: the merged rows, then the appended ones."""
        return (self.shape[0] + len(self.appended), *self.shape[1:]) if self.appended else self.shape


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


def _model_config(base: Checkpoint) -> dict | None:
    """The base's config.json, when it has one that parses: it settles fused Q/K/V layouts (roles.py)."""
    try:
        return base.side_json("config.json")
    except InputError:
        return None  # a config the plan cannot use leaves the layouts to the key names, as without one


def build_plan(spec: MergeSpec, base: Checkpoint, experts: list[Checkpoint]) -> tuple[list[PlanItem], dict[str, bytes]]:
    """Check that every expert matches the base key for key (names, shapes; floating or not, as
    the base: a bf16 base merges with fp16 or fp32 experts; added vocabulary rows as options.vocab
    says); decide each key's action. Returns the plan and the side files the output gets instead
    of the base's (the tokenizer and config with the tokens that options.vocab 'union' adds)."""
    base_keys = set(base.metas)
    passthrough_patterns = spec.effective_passthrough()
    overrides = spec.role_overrides()
    config = _model_config(base)
    notes: dict[str, list[str]] = {}
    added: dict[str, dict[int, TensorMeta]] = {}  # vocabulary key -> expert index -> its whole tensor's metadata
    for e, ex in enumerate(experts):
        for key, note in reconcile_tied_heads(base, ex).items():
            notes.setdefault(key, []).append(note)
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
                if vocab.added_rows(resolve_role(k, m.shape, overrides, config), m, em) is None:
                    raise IncompatibleCheckpointsError(f"tensor {k!r}: {ex.label} has shape {list(em.shape)}, base has {list(m.shape)}")
                if spec.options.vocab is None:
                    raise vocab.refuse(k, ex, em.shape[0], m.shape[0])
                if spec.options.vocab == "base":
                    notes.setdefault(k, []).append(vocab.dropped_note(ex, m.shape[0], em.shape[0]))
                added.setdefault(k, {})[e] = em
                vocab.truncate(ex, k, m.shape[0])  # the base's rows are merged as any others
            if em.dtype != m.dtype and not (em.dtype.is_floating_point and m.dtype.is_floating_point):
                # floating tensors of another precision are cast into the compute dtype like the base's
                raise IncompatibleCheckpointsError(f"tensor {k!r}: {ex.label} has dtype {em.dtype_name}, base has {m.dtype_name}")
    appended, side_files = _union(spec, base, experts, added, notes)
    requested = spec.output.dtype
    plan = []
    # Read in file order: sequential I/O on every checkpoint.
    for key in sorted(base.metas, key=lambda k: (base.metas[k].file, base.metas[k].start)):
        m = base.metas[key]
        role = resolve_role(key, m.shape, overrides, config)
        if not m.dtype.is_floating_point:  # index buffers (position_ids, ...): never weights, whatever their shape
            plan.append(PlanItem(key, RoleInfo(Role.other, source="non-floating buffer"), m.shape, m.dtype, m.dtype, "copy",
                                 "non-floating tensor: kept from base"))
            continue
        out = m.dtype if requested == "auto" else DTYPES[requested]
        passthrough = next((p for p in passthrough_patterns if fnmatch.fnmatchcase(key, p)), None)
        note = "; ".join(notes[key]) if key in notes else None
        if passthrough:
            plan.append(PlanItem(key, role, m.shape, m.dtype, out, "copy", f"passthrough pattern {passthrough!r}", note))
        else:
            plan.append(PlanItem(key, role, m.shape, m.dtype, out, "merge", note=note, appended=appended.get(key, ())))
    return plan, side_files


def _union(spec: MergeSpec, base: Checkpoint, experts: list[Checkpoint], added: dict[str, dict[int, TensorMeta]],
           notes: dict[str, list[str]]) -> tuple[dict[str, tuple], dict[str, bytes]]:
    """options.vocab 'union': per vocabulary key, the rows to append; and the output's tokenizer and config."""
    if spec.options.vocab != "union" or not added:
        return {}, {}
    rows = {base.metas[k].shape[0] for k in added}
    if len(rows) > 1:
        raise IncompatibleCheckpointsError(f"options.vocab: 'union' needs one base vocabulary size, the base's tensors "
                                           f"{sorted(added)} have {sorted(rows)} rows", field="options.vocab")
    base_rows = rows.pop()
    expert_rows = {e: max(m.shape[0] for per in added.values() for i, m in per.items() if i == e)
                   for e in sorted({i for per in added.values() for i in per})}
    union = vocab.build_union(base, experts, base_rows, expert_rows)
    appended = {}
    for key, per_expert in added.items():
        pairs = []
        for token in union.tokens:
            have = [(e, rows_of(per_expert[e], r, r + 1)) for e, r in token.rows if e in per_expert and r < per_expert[e].shape[0]]
            if not have:
                raise IncompatibleCheckpointsError(f"options.vocab: 'union' appends token {token.content!r}, but no expert "
                                                   f"that added it has a row for it in {key!r}", field="options.vocab")
            pairs.append(tuple(have))
        appended[key] = tuple(pairs)
        listed = ", ".join(repr(t.content) for t in union.tokens[:20]) + (" ..." if len(union.tokens) > 20 else "")
        notes.setdefault(key, []).append(f"{len(union.tokens)} token(s) appended as rows {base_rows}..{union.rows} "
                                         f"(options.vocab: union), each the mean of the experts that added it: {listed}")
    return appended, vocab.union_side_files(base, union)


@dataclass(frozen=True)
class DiagnosticsSample:
    """Which matrix keys the data-free diagnostics see (``plan_keys``) and how many of them they
    analyse whole (the spectral sample): 'full' analyses every matrix, 'sampled' 8% of them
    (ViT-B/16: 4 layers, one per role), at least 4 and at most 24."""
    plan_keys: tuple[str, ...]
    max_svd_layers: int
    svd_fraction: float
    min_svd_layers: int = 4

    @classmethod
    def of(cls, spec: MergeSpec, plan: list[PlanItem]) -> "DiagnosticsSample | None":
        if spec.options.diagnostics == "off":
            return None
        keys = tuple(p.key for p in plan if p.action == "merge" and len(p.shape) == 2 and p.role.role not in NON_MATRIX_2D_ROLES)
        full = spec.options.diagnostics == "full"
        return cls(keys, len(keys) if full else 24, 1.0 if full else 0.08)

    @property
    def analysed_whole(self) -> frozenset[str]:
        """The keys whose spectra are analysed: merged whole, never in tiles."""
        return frozenset(spectral_sample(self.plan_keys, self.max_svd_layers, self.svd_fraction, self.min_svd_layers))


@dataclass
class PreparedMerge:
    """What a merge starts from: the checkpoints (headers read, open), the plan, and the method
    (its parameters validated, its context: device, compute dtype, calibration)."""
    base: Checkpoint
    experts: list[Checkpoint]
    plan: list[PlanItem]
    method: MergeMethod
    memory: MemoryPlan  # the budget, the workers, and the keys merged in row blocks
    side_files: dict[str, bytes] = field(default_factory=dict)  # output side files in place of the base's
    diagnostics: DiagnosticsSample | None = None  # None: options.diagnostics is off

    @property
    def merged_items(self) -> list[PlanItem]:
        return [p for p in self.plan if p.action == "merge"]

    def close(self) -> None:
        for ck in (self.base, *self.experts):
            ck.close()


def prepare(spec: MergeSpec, cfg: IOConfig, calibration_files: dict[str, str] | None = None, *,
            pending_ok: bool = False, memory_budget: int | None = None) -> PreparedMerge:
    """Open headers, build the plan, open calibration, run the method's pre-flight check, and fit
    the plan into the memory budget (the spec's, capped by ``memory_budget``, the worker's)."""
    params = spec.method_params()
    method_cls = get_method(spec.method)
    device = pick_device(spec.options.device)
    base, experts = open_inputs(spec, cfg)
    try:
        plan, side_files = build_plan(spec, base, experts)
        calibration = None
        if method_cls.needs_calibration:
            calibration = open_calibration(spec, cfg, calibration_files, pending_ok=pending_ok)
        ctx = MergeContext(spec.expert_names(), device, DTYPES[spec.options.compute_dtype], calibration)
        method: MergeMethod = method_cls(params, ctx)
        method.check_plan([(p.key, p.role, p.shape) for p in plan if p.action == "merge"])
        diagnostics = DiagnosticsSample.of(spec, plan)
        memory = plan_memory(plan, len(experts), ctx.dtype, method, effective_budget(spec.options.memory_budget, memory_budget),
                             worker_count(spec.options.workers, device), tiles=device.type == "cpu",
                             whole_keys=diagnostics.analysed_whole if diagnostics else frozenset(), held=spec.alpha_auto)
    except BaseException:
        for ck in (base, *experts):
            ck.close()
        raise
    return PreparedMerge(base, experts, plan, method, memory, side_files, diagnostics)


@dataclass
class Preflight:
    """What merge() establishes before reading any tensor (see ``preflight``)."""
    spec: MergeSpec
    plan: list[PlanItem]
    base: Checkpoint  # closed: metadata only
    experts: list[Checkpoint]
    output_problem: str | None  # why publishing would fail (e.g. the target exists), or None
    memory: MemoryPlan
    cost: dict  # the estimated wall time and its parts (merging.cost.estimate_wall)


def preflight(spec: MergeSpec | dict, io: IOConfig | None = None, *, calibration_files: dict[str, str] | None = None,
              memory_budget: int | None = None) -> Preflight:
    """Every check merge() makes before reading a tensor, with no side effects: the spec, the
    checkpoint headers (keys, shapes, dtypes), the plan and roles, calibration coverage (statistics
    still to be captured from ``calibration.data`` are checked when the job runs), the method's own
    checks, and whether the output target can be published to."""
    spec = load_spec(spec)
    cfg = io or IOConfig()
    prepared = prepare(spec, cfg, calibration_files, pending_ok=True, memory_budget=memory_budget)
    prepared.close()
    problem = None
    try:
        Publisher(spec.output.uri, cfg, spec.output.overwrite).check_target()
    except MergeError as e:
        problem = e.message
    cost = estimate_wall(prepared.plan, prepared.method, len(prepared.experts), prepared.memory, prepared.method.ctx.device)
    return Preflight(spec, prepared.plan, prepared.base, prepared.experts, problem, prepared.memory, cost)

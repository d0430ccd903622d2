"""Before any tensor is read: open the checkpoints' headers, decide what happens to each tensor
(the plan), and make every check a merge makes up front. ``preflight`` is that step alone, with
no side effects (``submerge validate``, the service's ``:validate``)."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch

from merging.calibration import open_calibration
from merging.errors import IncompatibleCheckpointsError, MergeError, SpecError
from merging.io.checkpoint import Checkpoint, open_checkpoint
from merging.io.sources import IOConfig
from merging.io.writer import Publisher
from merging.methods import get_method
from merging.methods.base import MergeContext, MergeMethod
from merging.roles import Role, RoleInfo, resolve_role
from merging.spec import MergeSpec, load_spec

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
    reason: str | None = None


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
        out = m.dtype if requested == "auto" else DTYPES[requested]
        passthrough = next((p for p in passthrough_patterns if fnmatch.fnmatchcase(key, p)), None)
        if passthrough:
            plan.append(PlanItem(key, role, m.shape, m.dtype, out, "copy", f"passthrough pattern {passthrough!r}"))
        else:
            plan.append(PlanItem(key, role, m.shape, m.dtype, out, "merge"))
    return plan


@dataclass
class PreparedMerge:
    """What a merge starts from: the checkpoints (headers read, open), the plan, and the method
    (its parameters validated, its context: device, compute dtype, calibration)."""
    base: Checkpoint
    experts: list[Checkpoint]
    plan: list[PlanItem]
    method: MergeMethod

    @property
    def merged_items(self) -> list[PlanItem]:
        return [p for p in self.plan if p.action == "merge"]

    def close(self) -> None:
        for ck in (self.base, *self.experts):
            ck.close()


def prepare(spec: MergeSpec, cfg: IOConfig, calibration_files: dict[str, str] | None = None, *,
            pending_ok: bool = False) -> PreparedMerge:
    """Open headers, build the plan, open calibration, run the method's pre-flight check."""
    params = spec.method_params()
    method_cls = get_method(spec.method)
    device = pick_device(spec.options.device)
    base, experts = open_inputs(spec, cfg)
    try:
        plan = build_plan(spec, base, experts)
        calibration = None
        if method_cls.needs_calibration:
            calibration = open_calibration(spec, cfg, calibration_files, pending_ok=pending_ok)
        ctx = MergeContext(spec.expert_names(), device, DTYPES[spec.options.compute_dtype], calibration)
        method: MergeMethod = method_cls(params, ctx)
        method.check_plan([(p.key, p.role, p.shape) for p in plan if p.action == "merge"])
    except BaseException:
        for ck in (base, *experts):
            ck.close()
        raise
    return PreparedMerge(base, experts, plan, method)


@dataclass
class Preflight:
    """What merge() establishes before reading any tensor (see ``preflight``)."""
    spec: MergeSpec
    plan: list[PlanItem]
    base: Checkpoint  # closed: metadata only
    experts: list[Checkpoint]
    output_problem: str | None  # why publishing would fail (e.g. the target exists), or None


def preflight(spec: MergeSpec | dict, io: IOConfig | None = None, *, calibration_files: dict[str, str] | None = None) -> Preflight:
    """Every check merge() makes before reading a tensor, with no side effects: the spec, the
    checkpoint headers (keys, shapes, dtypes), the plan and roles, calibration coverage (statistics
    still to be captured from ``calibration.data`` are checked when the job runs), the method's own
    checks, and whether the output target can be published to."""
    spec = load_spec(spec)
    cfg = io or IOConfig()
    prepared = prepare(spec, cfg, calibration_files, pending_ok=True)
    prepared.close()
    problem = None
    try:
        Publisher(spec.output.uri, cfg, spec.output.overwrite).check_target()
    except MergeError as e:
        problem = e.message
    return Preflight(spec, prepared.plan, prepared.base, prepared.experts, problem)

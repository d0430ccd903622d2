"""The job spec: one pydantic model for the Python API, the CLI spec file, the REST body and the worker."""
from __future__ import annotations

import json
import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from merging.errors import SpecError
from merging.methods import get_method
from merging.roles import Role, RoleOverride

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """``"5GB"`` → 5_000_000_000; ``"500MiB"`` → 524_288_000; ints are bytes."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(value)
    unit = (m.group(2) or "").upper() if m else None
    if not m or unit not in _UNITS and unit + "B" not in _UNITS:
        raise ValueError(f"not a size: {value!r} (use bytes or e.g. '500MB', '2GiB')")
    unit = unit if unit in _UNITS else unit + "B"
    return int(float(m.group(1)) * _UNITS[unit])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CheckpointRef(_Strict):
    uri: str = Field(min_length=1, description="Local path, file://, s3://, http(s):// or hf://org/repo[@revision][/path].")
    revision: str | None = Field(None, description="For hf:// URIs: a branch, tag or commit to pin (same as @revision in the URI).")


class DataRef(_Strict):
    uri: str = Field(min_length=1, description="Rows of task data: JSONL, JSON (a list of objects), CSV or parquet; local path, file://, s3:// or http(s)://.")
    format: Literal["auto", "jsonl", "json", "csv", "parquet"] = Field("auto", description="'auto' goes by the file extension (.gz allowed).")


class CalibrationRef(_Strict):
    """ESM's layer-input statistics for one expert: precomputed (``uri``) or captured by the worker
    from unlabeled samples (``data``)."""
    uri: str | None = Field(None, min_length=1, description=(
        "safetensors file mapping a weight key to the layer inputs it saw (2-D, one row per token), "
        "or to their Gram matrix under '<key>:gram' with the token count under '<key>:count' "
        "(what `submerge calibrate` writes)."))
    data: DataRef | None = Field(None, description=(
        "Unlabeled samples: the expert's fine-tuned model is run on the first `samples` rows and the Gram "
        "matrix of every linear layer's inputs is captured (cached by checkpoint, data and samples)."))
    samples: int = Field(32, ge=1, le=100_000, description="Rows of `data` to run (with data only).")
    text_field: str = Field("text", min_length=1, description="Field of a row holding its text (with data only).")
    max_length: int = Field(128, ge=2, le=8192, description="Tokens per sample, longer texts are truncated (with data only).")

    @model_validator(mode="after")
    def _one_source(self) -> "CalibrationRef":
        if (self.uri is None) == (self.data is None):
            raise ValueError("calibration: give either 'uri' (precomputed statistics) or 'data' (samples to capture them from), "
                             + ("not both" if self.uri else "one is required"))
        return self


class ExpertRef(CheckpointRef):
    name: str | None = Field(None, description="Display name; defaults to expert<i>.")
    calibration: CalibrationRef | None = None


class OutputSpec(_Strict):
    uri: str = Field(min_length=1, description="Directory to publish the merged model to (local path, file:// or s3://).")
    dtype: Literal["auto", "float32", "float16", "bfloat16", "float64"] = Field(
        "auto", description="Dtype of merged floating tensors; 'auto' keeps each base tensor's dtype.")
    shard_size: int | str = Field("5GB", validate_default=True, description="Maximum bytes per output shard, e.g. '2GB' (bytes as an integer also work).")
    overwrite: bool = Field(False, description="Replace an existing model at output.uri.")

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v: int | str) -> int:
        n = parse_size(v)
        if n < 1024:
            raise ValueError("shard_size must be at least 1 KiB")
        return n


class RoleOverrideSpec(_Strict):
    pattern: str = Field(min_length=1, description="fnmatch glob over full tensor keys, e.g. '*.attn.c_attn.weight'.")
    role: Role
    transposed: bool | None = Field(None, description="Stored as (in, out); default: as inferred.")


class RunOptions(_Strict):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' uses CUDA when torch sees a GPU.")
    compute_dtype: Literal["float32", "float64"] = Field("float32", description="Precision of all merge arithmetic.")
    check_finite: bool = Field(True, description="Reject NaN/Inf in any input tensor.")
    diagnostics: Literal["sampled", "full", "off"] = Field("sampled", description=(
        "Data-free merge diagnostics written to diagnostics.json: 'sampled' analyses spectra, SAR, STI and "
        "HO-GSVD on an evenly spread 8% of the matrix layers (at least 4, at most 24); 'full' on every matrix layer; "
        "norms and cosines always cover every tensor."))
    workers: int | None = Field(None, ge=1, le=64, description=(
        "Tensors merged concurrently on CPU, each with one torch thread. Default: one per CPU core this "
        "process may use, at most 8 (LAPACK's eigensolvers scale poorly across threads; whole tensors "
        "in parallel do), fewer when the largest tensor's job (T + 1 copies, ~3x with working copies) "
        "would put the jobs in flight over a quarter of the memory. 1: one tensor at a time with torch's "
        "own threads. Ignored on CUDA."))
    vocab: Literal["base", "union"] | None = Field(None, description=(
        "Experts whose vocabulary adds tokens to the base's (rows appended to the embedding table and LM head): "
        "'base' keeps the base's tokens and drops the added rows; 'union' appends each added token once, its row the "
        "mean over the experts that added it, and writes a tokenizer and config that have them. Unset: such experts "
        "are refused."))
    memory_budget: int | str | None = Field(None, description=(
        "Bytes the merge's tensors may take at once, e.g. '4GB'. Element-wise work (weight averaging, Task "
        "Arithmetic, TIES, DARE, Consensus, and the mean-merged tensors of the SVD methods) runs in row blocks sized "
        "to fit; a tensor whose method needs it whole and does not fit is refused before any merge work, naming it. "
        "Default: half the memory this process may use (cgroup limit or RAM), or the worker's SUBMERGE_MEMORY_BUDGET "
        "when that is smaller."))

    @field_validator("memory_budget")
    @classmethod
    def _budget(cls, v: int | str | None) -> int | None:
        if v is None:
            return None
        n = parse_size(v)
        if n < 1 << 20:
            raise ValueError("memory_budget must be at least 1 MiB")
        return n


# The one list of evaluator names: evaluation.evaluators.REGISTRY implements exactly these.
EVALUATORS = ("text_zero_shot", "sequence_classification")
Evaluator = Literal[EVALUATORS]  # a Literal of the tuple's strings


class TaskSpec(_Strict):
    """One expert's task: its data and how the merged model is scored on it."""
    expert: str = Field(min_length=1, description="Name of the expert fine-tuned on this task.")
    name: str | None = Field(None, description="Task name in the report; defaults to the expert's name.")
    test: DataRef = Field(description="Rows scored for the report.")
    validation: DataRef | None = Field(None, description="Rows scored while choosing α (params.alpha = 'auto').")
    evaluator: Evaluator | None = Field(None, description="Overrides evaluation.evaluator for this task.")
    text_field: str = Field("text", min_length=1)
    label_field: str = Field("label", min_length=1)
    labels: list[str] | None = Field(None, min_length=2, description=(
        "Class names in class-index order. text_zero_shot needs them (one prompt per class); a row's label "
        "may be a class index or one of these names."))
    prompt: str = Field("{label}", description="text_zero_shot: the prompt of class c is prompt.format(label=labels[c]).")
    max_samples: int | None = Field(None, ge=1, description="Score at most this many rows of each split (the first ones).")

    @field_validator("prompt")
    @classmethod
    def _has_label(cls, v: str) -> str:
        if "{label}" not in v:
            raise ValueError("prompt must contain '{label}'")
        return v


class EvaluationSpec(_Strict):
    evaluator: Evaluator = Field("text_zero_shot", description=(
        "text_zero_shot: normalized mean-pooled sentence embeddings scored against label-prompt embeddings of the base "
        "model (cosine logits); sequence_classification: each expert's own head on the merged backbone."))
    adapter: str = Field("hf_transformers", description=(
        "How a checkpoint becomes a runnable model: 'hf_transformers' (a transformers model directory with config.json "
        "and tokenizer), or 'python:package.module:function' for a custom loader."))
    tasks: list[TaskSpec] = Field(min_length=1)
    baselines: bool = Field(True, description=(
        "Also score the base (zero-shot) and each expert on its own task, for normalized accuracy and NAI "
        "(cached per checkpoint and data)."))
    heads: list[str] = Field(default_factory=lambda: ["classifier.*"], description=(
        "sequence_classification: glob patterns of the head tensors. They are not merged (copied from the base); "
        "each task is scored with its expert's head."))
    batch_size: int = Field(32, ge=1, le=4096)
    max_length: int = Field(128, ge=2, le=8192, description="Tokens per text; longer texts are truncated.")

    def evaluator_of(self, task: TaskSpec) -> str:
        return task.evaluator or self.evaluator

    def uses(self, evaluator: str) -> bool:
        return any(self.evaluator_of(t) == evaluator for t in self.tasks)


class MergeSpec(_Strict):
    # minLength/minItems are stated for the JSON schema only (json_schema_extra): the validators below
    # enforce them with messages that name the known methods and the expert count.
    method: str = Field(description="Method id, see GET /v1/methods or `submerge methods`.",
                        json_schema_extra={"minLength": 1})
    params: dict[str, Any] = Field(default_factory=dict, description="Method parameters; validated against the method's schema.")
    base: CheckpointRef
    experts: list[ExpertRef] = Field(description="At least two fine-tuned checkpoints of the base.",
                                     json_schema_extra={"minItems": 2})
    output: OutputSpec
    roles: list[RoleOverrideSpec] = Field(default_factory=list, description="Layer-role overrides; first match wins.")
    passthrough: list[str] = Field(default_factory=list, description="Glob patterns of keys copied from the base unmerged.")
    options: RunOptions = Field(default_factory=RunOptions)
    evaluation: EvaluationSpec | None = Field(None, description=(
        "Score the merged model on each expert's task data (report.json 'evaluation'); needed for params.alpha = 'auto'."))
    callback_url: str | None = Field(None, pattern=r"^https?://", description=(
        "Service only: POSTed when the job finishes, signed Standard-Webhooks style. The library ignores it."))

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        try:
            get_method(v)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        return v

    @field_validator("experts")
    @classmethod
    def _two_experts(cls, v: list[ExpertRef]) -> list[ExpertRef]:
        if len(v) < 2:
            raise ValueError(f"at least 2 experts are required to merge, got {len(v)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> "MergeSpec":
        names = self.expert_names()
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"experts: duplicate expert name(s) {dup}")
        params = self.method_params()  # raises a ValueError that names params.<field>
        method = get_method(self.method)
        problem = method.check_experts(params, len(self.experts))
        if problem:
            raise ValueError(problem)
        if self.evaluation is not None:
            for i, task in enumerate(self.evaluation.tasks):
                if task.expert not in names:
                    raise ValueError(f"evaluation.tasks.{i}.expert: no expert named {task.expert!r} (experts: {names})")
                if self.evaluation.evaluator_of(task) == "text_zero_shot" and not task.labels:
                    raise ValueError(f"evaluation.tasks.{i}.labels: text_zero_shot needs the class names (one prompt per class)")
            tasks = [t.name or t.expert for t in self.evaluation.tasks]
            dup = sorted({n for n in tasks if tasks.count(n) > 1})
            if dup:
                raise ValueError(f"evaluation.tasks: duplicate task name(s) {dup}")
        if self.alpha_auto and method.alpha_search is None:
            raise ValueError(f"params.alpha: 'auto' is not available for method {self.method!r} (it has no α to search)")
        for name in (["alpha"] if self.alpha_auto else []) + self.searched_params:
            missing = [] if self.evaluation is None else [i for i, t in enumerate(self.evaluation.tasks) if t.validation is None]
            if self.evaluation is None or missing:
                why = ("the spec has no evaluation section" if self.evaluation is None
                       else f"evaluation.tasks.{missing[0]}.validation is missing")
                symbol = "α" if name == "alpha" else name
                raise ValueError(f"params.{name}: 'auto' chooses {symbol} on validation data, but {why}")
        if self.searched_params:  # chosen per expert: every expert needs a task to be scored on
            covered = {t.expert for t in self.evaluation.tasks}
            lacking = [n for n in names if n not in covered]
            if lacking:
                raise ValueError(f"params.{self.searched_params[0]}: 'auto' is chosen per expert on its task's validation "
                                 f"split, but expert {lacking[0]!r} has no evaluation task")
        return self

    @property
    def alpha_auto(self) -> bool:
        """``params.alpha == "auto"``: α is chosen on validation data (ALGORITHMS.md §0)."""
        return self.params.get("alpha") == "auto"

    @property
    def searched_params(self) -> list[str]:
        """Parameters other than α set to "auto" (``MergeMethod.validation_searched``): the
        evaluation pipeline chooses them on validation data before the merge."""
        return [n for n in get_method(self.method).validation_searched if self.params.get(n) == "auto"]

    def effective_passthrough(self) -> list[str]:
        """Passthrough patterns, plus the classification heads when an evaluator keeps per-task heads."""
        extra = self.evaluation.heads if self.evaluation is not None and self.evaluation.uses("sequence_classification") else []
        return [*self.passthrough, *(p for p in extra if p not in self.passthrough)]

    def expert_names(self) -> list[str]:
        return [e.name or f"expert{i}" for i, e in enumerate(self.experts)]

    def method_params(self):
        """The typed parameter model of the chosen method (validated)."""
        cls = get_method(self.method)
        # With alpha "auto" the parameter model sees its default; the search replaces it later.
        params = {k: v for k, v in self.params.items() if not (k == "alpha" and v == "auto")}
        try:
            return cls.Params.model_validate(params)
        except ValidationError as e:
            raise ValueError(format_validation_error(e, prefix="params", method=self.method)) from None

    def role_overrides(self) -> list[RoleOverride]:
        return [RoleOverride(r.pattern, r.role, r.transposed) for r in self.roles]


def format_validation_error(e: ValidationError, prefix: str = "", method: str | None = None) -> str:
    """One line per problem, each naming the dotted field path."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in ((prefix,) if prefix else ()) + tuple(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown parameter" + (f" for method {method!r}" if method else "")
        # Model-level validators have no location; their messages already name the field.
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def load_spec(data: dict | MergeSpec) -> MergeSpec:
    """Validate a spec dict; raise ``SpecError`` with every problem named by field."""
    if isinstance(data, MergeSpec):
        return data
    try:
        return MergeSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_validation_error(e)) from None


def load_spec_file(path: str) -> MergeSpec:
    """Read a JSON or YAML spec file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise SpecError(f"cannot read spec file {path}: {e.strerror}") from None
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise SpecError(f"spec file {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {e}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise SpecError(f"spec file {path} must contain an object at the top level")
    return load_spec(data)

"""How long a merge will take, before it runs: a cost model fitted by ``bench/calibrate_cost.py``.

A merge streams its inputs once per pass (the pre-passes, then the merge pass), computes on
``workers`` threads while the next inputs are read, and writes its output. So the estimate is

    wall ≈ startup + max(read, compute / workers) + write

with ``read`` = bytes read / the measured read rate, ``write`` = bytes written / the measured
write rate (hashing included), and ``compute`` the sum over merged keys of

* element-wise work (every key of WA, TA, TIES, DARE, Consensus, Breadcrumbs, the mean-merged keys
  of the SVD methods): the method's seconds per task-vector entry × T × entries;
* an SVD method's matrix (``is_matrix``): the method's seconds per unit × T × m × n × min(m, n),
  the order of its decompositions' cost.

The constants are measured on one machine class and device (``cost_model.json`` beside this
module says which, and when). They are an estimate for that class: another CPU scales them, and a
device without a fitted model gets no estimate (``estimate_wall`` returns None and says why).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from merging.roles import is_matrix

if TYPE_CHECKING:  # plan imports this module for preflight
    from merging.memory import MemoryPlan
    from merging.methods.base import MergeMethod
    from merging.plan import PlanItem

MODEL_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cost_model.json")


@dataclass(frozen=True)
class CostModel:
    device: str  # the device type it was fitted on ("cpu")
    measured: str  # where and when: machine, date, commit
    startup_s: float
    read_bytes_per_s: float
    write_bytes_per_s: float
    elementwise_s: dict[str, float]  # method -> seconds per task-vector entry, one worker
    matrix_s: dict[str, float]  # SVD method -> seconds per T·m·n·min(m, n), one worker

    @classmethod
    def load(cls, path: str = MODEL_FILE) -> "CostModel | None":
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class WorkUnits:
    """What a merge streams and computes, in the cost model's units."""
    read_bytes: int
    write_bytes: int
    elementwise: float  # T × entries of the keys merged element-wise
    matrix: float  # Σ T·m·n·min(m, n) of the matrices an SVD method decomposes


def model_key(method: MergeMethod) -> str:
    """The method's entry in the cost model: its name, with '+subspace_boosting' when it boosts."""
    boosted = getattr(method.params, "subspace_boosting", None) is not None
    return method.name + ("+subspace_boosting" if boosted else "")


# The methods whose matrices cost decompositions (their other keys are means), and Subspace Boosting,
# which takes the SVD of every merged matrix.
_DECOMPOSING = frozenset({"tsv_m", "iso_c", "iso_cts", "esm"})


def work_units(plan: list[PlanItem], method: MergeMethod, n_experts: int) -> WorkUnits:
    read = write = 0
    elementwise = matrix = 0.0
    passes = 1 + method.prepasses
    decomposes = method.name in _DECOMPOSING or model_key(method) != method.name
    for item in plan:
        entries = math.prod(item.shape)
        write += math.prod(item.out_shape) * item.out_dtype.itemsize
        if item.action != "merge":
            read += entries * item.in_dtype.itemsize
            continue
        read += passes * (n_experts + 1) * entries * item.in_dtype.itemsize
        if decomposes and is_matrix(item.role, item.shape):
            m, n = item.shape
            matrix += n_experts * m * n * min(m, n)
        else:
            elementwise += n_experts * entries
    return WorkUnits(read, write, elementwise, matrix)


def estimate_wall(plan: list[PlanItem], method: MergeMethod, n_experts: int, memory: MemoryPlan,
                  device: torch.device, model: CostModel | None = None) -> dict[str, Any]:
    """The estimated wall time of the merge (``estimated_wall_s``; None, with the ``reason``, when
    there is no fitted model for this device or method), its parts, and the model it came from."""
    model = model if model is not None else CostModel.load()
    key = model_key(method)
    if model is None or model.device != device.type:
        return {"estimated_wall_s": None, "reason": f"no cost model fitted for device {device.type!r}"}
    units = work_units(plan, method, n_experts)
    if (units.elementwise and key not in model.elementwise_s) or (units.matrix and key not in model.matrix_s):
        return {"estimated_wall_s": None, "reason": f"no cost model fitted for {key!r}"}
    compute = units.elementwise * model.elementwise_s.get(key, 0.0) + units.matrix * model.matrix_s.get(key, 0.0)
    read = units.read_bytes / model.read_bytes_per_s
    write = units.write_bytes / model.write_bytes_per_s
    compute_wall = compute / max(1, memory.workers)
    wall = model.startup_s + max(read, compute_wall) + write
    return {"estimated_wall_s": round(wall, 1),
            "parts_s": {"read": round(read, 1), "compute": round(compute_wall, 1), "write": round(write, 1),
                        "startup": round(model.startup_s, 1)},
            "model": {"device": model.device, "measured": model.measured}}

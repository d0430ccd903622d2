"""Choosing α on validation data, as the official codes do (ALGORITHMS.md §0).

Every official implementation searches the global scale α of ``θ0 + α·τ_merged`` on held-out
validation data instead of fixing it:

* TA, TIES, Consensus (and the other sum-type baselines): a grid α ∈ {1/30, 2/30, …, 1};
* TSV-M, Iso-C, Iso-CTS: a grid α ∈ {0.1, 0.2, …, 3.0}; the Iso code stops early after 3
  consecutive grid points that do not improve the mean accuracy;
* ESM: golden-section search on [0, 2] (tolerance 0.01, at most 15 iterations) maximising the
  mean accuracy.

The chosen α is the evaluated point with the highest mean *normalized* accuracy (accuracy over
the expert's own accuracy, averaged over tasks), ties going to the first evaluated. This module
knows nothing about models: ``evaluate(α)`` is supplied by the caller.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal


@dataclass(frozen=True)
class AlphaScore:
    alpha: float
    avg_accuracy: float     # mean over tasks of accuracy ("avg_top1")
    avg_normalized: float   # mean over tasks of accuracy / expert accuracy ("avg_normalized_top1")
    per_task: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AlphaSearch:
    kind: Literal["grid", "golden"]
    grid: tuple[float, ...] = ()
    early_stop: int | None = None          # grid: stop after this many steps without a better avg_accuracy
    interval: tuple[float, float] = (0.0, 2.0)  # golden
    tol: float = 0.01
    max_iter: int = 15

    def describe(self) -> dict:
        if self.kind == "grid":
            return {"kind": "grid", "grid": [round(a, 6) for a in self.grid], "early_stop": self.early_stop,
                    "objective": "avg_normalized_accuracy"}
        return {"kind": "golden_section", "interval": list(self.interval), "tol": self.tol, "max_iter": self.max_iter,
                "objective": "avg_accuracy", "chosen_by": "avg_normalized_accuracy among evaluated points"}


SUM_GRID = AlphaSearch("grid", tuple(i / 30 for i in range(1, 31)))
SVD_GRID = AlphaSearch("grid", tuple(i / 10 for i in range(1, 31)))
ISO_GRID = AlphaSearch("grid", SVD_GRID.grid, early_stop=3)
ESM_GOLDEN = AlphaSearch("golden")

_INV_PHI = (math.sqrt(5) - 1) / 2  # 0.618…


def search_alpha(search: AlphaSearch, evaluate: Callable[[float], AlphaScore]) -> tuple[AlphaScore, list[AlphaScore]]:
    """Run the search; returns (chosen point, every evaluated point in evaluation order)."""
    curve: list[AlphaScore] = []
    seen: dict[float, AlphaScore] = {}

    def score(a: float) -> AlphaScore:
        a = round(a, 10)
        if a not in seen:
            seen[a] = evaluate(a)
            curve.append(seen[a])
        return seen[a]

    if search.kind == "grid":
        best, stale = -math.inf, 0
        for a in search.grid:
            s = score(a)
            if s.avg_accuracy > best:
                best, stale = s.avg_accuracy, 0
            else:
                stale += 1
                if search.early_stop is not None and stale >= search.early_stop:
                    break
    else:
        lo, hi = search.interval
        c, d = hi - _INV_PHI * (hi - lo), lo + _INV_PHI * (hi - lo)
        for _ in range(search.max_iter):
            if hi - lo <= search.tol:
                break
            if score(c).avg_accuracy >= score(d).avg_accuracy:
                hi, d = d, c
                c = hi - _INV_PHI * (hi - lo)
            else:
                lo, c = c, d
                d = lo + _INV_PHI * (hi - lo)
    chosen = max(curve, key=lambda s: s.avg_normalized)  # max() keeps the first of equal scores
    return chosen, curve

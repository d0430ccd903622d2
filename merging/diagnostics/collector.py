"""``DiagnosticsCollector``: gathers the data-free diagnostics while the engine merges.

The engine calls ``observe(job, merged)`` once per merged key (possibly from several worker
threads at once) with the key's ``TensorJob`` and the merged *task vector* τ_merged (same
orientation as ``job.taus[0]``, before α), and ``finish()`` at the end for the JSON report.

Cost model. Cheap statistics (task and merged norms, the (T+1)×(T+1) Gram matrix of the
flattened vectors, hence all cosines) are computed for every key: one pass over the T task
vectors. Everything that needs a spectrum is computed only on a deterministic sample of the 2-D
matrix keys (``max_svd_layers``, chosen up front from ``plan_keys``: evenly spread over the model
in plan order, stratified by the role the key's name implies so that every kind of layer is
represented at several depths), and HO-GSVD only on ``hogsvd_layers`` of those. Per analysed
layer the price is one small-side Gram matrix + ``eigh`` per task and for the merged matrix, the
projections for SAR and a few products of the concatenated factors for STI.

Thread safety: the math runs outside the lock on the caller's thread; only the bookkeeping
(storing one small record per key) happens under ``self._lock``. Nothing large is retained:
the collector never keeps a reference to ``job.taus`` or ``merged``.

A failure inside the diagnostics never fails the merge: it is recorded in the report's
``errors`` list (``{"key", "stage", "error"}``) and the key's analysis is skipped.

Report (``finish()``, format ``submerge.diagnostics/1``; floats rounded to 6 significant digits,
NaN → null): ``method``, ``params``, ``experts``, ``labels`` (what each metric is, which are
reconstructions), ``sampling`` (which layers were analysed and how they were chosen), ``model``
(whole-model task norms, cosine matrix, cosines to τ_merged, the same ``per_role``), ``per_task``
(SAR, Iso SAR, energy kept: means over the analysed layers, by expert name), ``summary``
(mean/median/min/max/n of every per-layer metric, overall and ``per_role``), ``layers`` (cheap
statistics of every key in plan order), ``svd_layers`` (spectra, truncation, energy kept, SAR, STI,
rank collapse and, for the HO-GSVD sample, ``hogsvd``), ``hogsvd`` (analysed layers and the mean
task-similarity matrix), ``errors`` and ``cost_s`` (seconds spent in ``observe``, summed over threads).
"""
from __future__ import annotations

import math
import statistics
import threading
import time
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Sequence

import torch

from merging.diagnostics import metrics as M
from merging.linalg.spectral import small_side_eig, spectral_dtype, top_factors
from merging.methods.base import TensorJob
from merging.roles import infer_role

REPORT_FORMAT = "submerge.diagnostics/1"


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

def svd_sample_size(n_keys: int, max_layers: int, fraction: float, min_layers: int) -> int:
    """How many matrix keys get the spectral analysis:
    ``min(max_layers, n_keys, max(min_layers, ceil(fraction · n_keys)))``.

    The spectral work per analysed layer is about 0.6x what TSV-M itself spends on that layer (T
    small-side eigendecompositions plus the SAR projections), so the *fraction* of layers analysed
    sets the overhead relative to the merge; ``max_layers`` caps it for very deep models and
    ``min_layers`` keeps a useful sample for small ones."""
    want = max(int(min_layers), int(math.ceil(fraction * n_keys)))
    return max(0, min(int(max_layers), n_keys, want))


def spectral_sample(plan_keys: Sequence[str], max_layers: int, fraction: float, min_layers: int) -> list[str]:
    """The matrix keys that get the spectral analysis: ``svd_sample_size`` of them, by ``select_layers``."""
    return select_layers(plan_keys, svd_sample_size(len(plan_keys), max_layers, fraction, min_layers))


def select_layers(keys: Sequence[str], count: int) -> list[str]:
    """Deterministic sample of ``count`` keys, evenly spread, stratified by name-inferred role.

    Keys are grouped by the role ``roles.infer_role`` gives their name as a 2-D tensor (attention
    QKV, attention out, MLP up, MLP down, other matrices, ...). Each group gets a share of
    ``count`` proportional to its size (largest remainder; ties go to the group seen first), and
    inside a group of g keys with quota q the keys at positions ``floor((j + ½)·g/q)`` are taken
    (evenly spread, centred). The result is in the order of ``keys``. Plain even spacing over the
    plan would alias with the period of the layer pattern (e.g. take only QKV and MLP-up of a ViT).
    """
    keys = list(keys)
    if count >= len(keys):
        return keys
    if count <= 0:
        return []
    groups: "OrderedDict[str, list[int]]" = OrderedDict()
    for i, k in enumerate(keys):
        groups.setdefault(infer_role(k, (2, 2)).role.value, []).append(i)
    total = len(keys)
    exact = {g: count * len(ix) / total for g, ix in groups.items()}
    quota = {g: int(math.floor(x)) for g, x in exact.items()}
    left = count - sum(quota.values())
    order = sorted(groups, key=lambda g: (-(exact[g] - quota[g]), list(groups).index(g)))
    for g in order[:left]:
        quota[g] += 1
    chosen: list[int] = []
    for g, ix in groups.items():
        q = min(quota[g], len(ix))
        chosen += [ix[int(math.floor((j + 0.5) * len(ix) / q))] for j in range(q)]
    return [keys[i] for i in sorted(set(chosen))]


# ---------------------------------------------------------------------------------------------
# JSON helpers
# ---------------------------------------------------------------------------------------------

def _num(x: Any, digits: int = 6) -> float | int | None:
    """A JSON-safe number: ints kept, floats rounded to ``digits`` significant digits, NaN/Inf → None."""
    if x is None or isinstance(x, bool):
        return x
    if isinstance(x, int):
        return x
    x = float(x)
    if not math.isfinite(x):
        return None
    if x == 0:
        return 0.0
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (float, int)) or obj is None or isinstance(obj, bool):
        return _num(obj)
    return obj


def _stats(values: Iterable[float | None]) -> dict[str, Any] | None:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return None
    return {"mean": statistics.fmean(v), "median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def _mean(values: Iterable[float | None]) -> float | None:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    return statistics.fmean(v) if v else None


# ---------------------------------------------------------------------------------------------
# Per-layer spectral analysis
# ---------------------------------------------------------------------------------------------

def analyse_layer(taus: torch.Tensor, merged: torch.Tensor, *, method: str, params: Mapping[str, Any],
                  role, n_top: int = 16, profile_points: int = 48, hogsvd: bool = False, hogsvd_pi: float = 1e-3,
                  hogsvd_common_tol: float = 1e-2, hogsvd_max_dim: int | None = 256) -> dict[str, Any]:
    """All spectral diagnostics of one matrix key: spectra of the T task matrices and of the merged
    matrix, energy kept by the method's truncation, SAR (+ Iso variant), STI before/after, rank
    collapse and (``hogsvd=True``) the HO-GSVD analysis. Returns plain Python data (JSON-ready
    after rounding) plus timings."""
    t0 = time.perf_counter()
    n_tasks, m, n = taus.shape
    r = min(m, n)
    dtype = spectral_dtype(taus)
    x = taus.to(dtype)
    mx = merged.to(dtype)
    eigs = [small_side_eig(x[t]) for t in range(n_tasks)]
    merged_eig = small_side_eig(mx)
    task_s = [e.s.to(torch.float64).cpu() for e in eigs]
    merged_s = merged_eig.s.to(torch.float64).cpu()
    idx = M.profile_indices(r, profile_points)
    out: dict[str, Any] = {
        "shape": [m, n],
        "spectra": {
            "tasks": [M.spectrum_summary(s, n_top) for s in task_s],
            "merged": M.spectrum_summary(merged_s, n_top),
            "profile": {"index": idx, "tasks": [s[idx].tolist() for s in task_s], "merged": merged_s[idx].tolist()},
        },
    }
    grams = torch.stack([e.gram for e in eigs])
    total = x.sum(0)
    basis_name = M.sar_basis(method, params, role)
    trunc = M.method_truncation(method, params, (m, n), n_tasks, role)
    common_space = trunc is not None and trunc.common is not None
    sum_eig = small_side_eig(total) if basis_name == "task_sum" or common_space else None
    out["truncation"] = None if trunc is None else trunc.report(n_tasks)
    if common_space:  # a common space of the sum, plus each task's top residual directions outside it
        u_common = top_factors(total, sum_eig, trunc.common)[0]
        out["energy_kept"] = M.iso_energy_kept(x, u_common, trunc.residual, grams)
        out["truncation"]["energy_rule"] = "(‖U_cᵀΔ_t‖² + top-s energy of the residual) / ‖Δ_t‖², U_c = top-k of Σ_t Δ_t"
    elif trunc is not None:
        out["energy_kept"] = [M.energy_kept(task_s[t], trunc.per_task) for t in range(n_tasks)]
        out["truncation"]["energy_rule"] = "Σ_{i<k} σ_i² / Σ σ_i² of Δ_t" + (
            f" (upper bound: {trunc.upper_bound})" if trunc.upper_bound else "")
    else:
        out["energy_kept"] = None
    sq_norms = grams.diagonal(dim1=-2, dim2=-1).sum(-1).to(torch.float64)  # ‖Δ_t‖_F² = tr(Gram)
    out["sar"] = M.sar(x, mx, merged_eig=merged_eig, basis=total if basis_name == "task_sum" else None, basis_eig=sum_eig,
                       task_grams=grams if merged_eig.side == "left" else None, task_sq_norms=sq_norms)
    out["sar"]["basis"] = basis_name
    out["sti"] = M.sti_before_after(x, M.sti_rank(m, n, n_tasks), M.method_class(method).orthogonalises, eigs)
    out["rank_collapse"] = M.rank_collapse(merged_s, task_s)
    t1 = time.perf_counter()
    out["cost_s"] = {"svd": t1 - t0}
    if hogsvd:
        res = M.hogsvd(grams=torch.stack([e.gram for e in eigs]), pi=hogsvd_pi, common_tol=hogsvd_common_tol,
                       max_dim=hogsvd_max_dim)
        lam = res["eigenvalues"]
        owners = [0] * n_tasks
        for o in res["isolated_owner"]:
            owners[o] += 1
        out["hogsvd"] = {
            "orientation": "D_i = Δ_i (shared basis on the input side)" if m >= n else "D_i = Δ_iᵀ (shared basis on the output side)",
            "pi": res["pi"], "reduced_dim": res["reduced_dim"], "energy_retained": res["energy_retained"],
            "eigenvalues": lam[M.profile_indices(lam.numel(), profile_points)].tolist(),
            "eigenvalue_quantiles": {q: float(torch.quantile(lam, q / 100)) for q in (0, 10, 50, 90, 100)} if lam.numel() else {},
            "n_common": len(res["common"]), "common": res["common"], "common_tol": res["common_tol"],
            "n_isolated": len(res["isolated"]), "isolated_per_task": owners, "lambda_isolated": res["lambda_isolated"],
            "mean_share_per_task": res["shares"].mean(1).tolist(),
            "similarity": res["similarity"].tolist(),
            "label": res["label"],
        }
        out["cost_s"]["hogsvd"] = time.perf_counter() - t1
    return out


# ---------------------------------------------------------------------------------------------
# The collector
# ---------------------------------------------------------------------------------------------

class DiagnosticsCollector:
    """Collects merge diagnostics key by key; thread-safe; ``finish()`` returns the JSON report.

    Parameters
    ----------
    method, params, expert_names:
        The method id, its resolved parameters (``params.model_dump(mode="json", by_alias=True)``) and
        the expert names (T = len(expert_names); task order of ``job.taus``).
    max_svd_layers:
        At most this many of the 2-D matrix keys get the spectral analysis (deterministic sample,
        see ``select_layers``); the sample size is ``svd_sample_size(len(plan_keys), max_svd_layers,
        svd_fraction, min_svd_layers)``. All keys get the cheap statistics.
    hogsvd_layers:
        How many of the sampled layers also get the HO-GSVD analysis (sampled the same way).
    plan_keys:
        Every 2-D matrix key of the plan, in plan order (the keys for which ``job.is_matrix``
        will hold). The sample is chosen from it up front.
    svd_fraction, min_svd_layers:
        The sample is ``ceil(svd_fraction · #matrix keys)`` layers, at least ``min_svd_layers`` and
        at most ``max_svd_layers``: 8 of the 50 matrix keys of a 12-block ViT-B/16, which keeps the
        diagnostics near 12 % of a TSV-M merge on CPU (``python -m merging.diagnostics.costbench``).
    hogsvd_pi, hogsvd_common_tol, hogsvd_max_dim:
        π of the regularisation, the tolerance of λ ≈ 1 for the common subspace, and the number
        of principal directions of the stacked task matrices the HO-GSVD is computed in.
    """

    def __init__(self, method: str, params: Mapping[str, Any] | None, expert_names: Sequence[str],
                 max_svd_layers: int = 24, hogsvd_layers: int = 4, *, plan_keys: Sequence[str],
                 svd_fraction: float = 0.15, min_svd_layers: int = 4, n_top: int = 16, profile_points: int = 48,
                 hogsvd_pi: float = 1e-3, hogsvd_common_tol: float = 1e-2, hogsvd_max_dim: int | None = 256):
        self.method = method
        self.params = dict(params or {})
        self.expert_names = list(expert_names)
        self.n_tasks = len(self.expert_names)
        self.plan_keys = list(dict.fromkeys(plan_keys))
        self.max_svd_layers = int(max_svd_layers)
        self.hogsvd_layers = int(hogsvd_layers)
        self.n_top, self.profile_points = n_top, profile_points
        self.hogsvd_pi, self.hogsvd_common_tol, self.hogsvd_max_dim = hogsvd_pi, hogsvd_common_tol, hogsvd_max_dim
        self.svd_fraction, self.min_svd_layers = float(svd_fraction), int(min_svd_layers)
        self.svd_keys = spectral_sample(self.plan_keys, self.max_svd_layers, self.svd_fraction, self.min_svd_layers)
        self.hogsvd_keys = select_layers(self.svd_keys, self.hogsvd_layers) if self.n_tasks >= 2 else []
        self._svd_set, self._hogsvd_set = set(self.svd_keys), set(self.hogsvd_keys)
        self._plan_pos = {k: i for i, k in enumerate(self.plan_keys)}
        self._lock = threading.Lock()
        self._layers: dict[str, dict[str, Any]] = {}
        self._grams: dict[str, torch.Tensor] = {}
        self._block_grams: dict[str, dict[int, tuple[int, torch.Tensor]]] = {}  # key -> first row -> (stop, Gram)
        self._svd: dict[str, dict[str, Any]] = {}
        self._scale: dict[str, float] = {}
        self._errors: list[dict[str, str]] = []
        self._cost = {"cheap": 0.0, "svd": 0.0, "hogsvd": 0.0}
        self._finished: dict[str, Any] | None = None

    # -- streaming ---------------------------------------------------------------------------
    def observe(self, job: TensorJob, merged: torch.Tensor) -> None:
        """Record the diagnostics of one key. ``merged`` is τ_merged for ``job.key`` (before α),
        oriented like ``job.taus[0]``. Safe to call from several threads at once. A key merged in
        row blocks is observed once per block: its Gram matrices add up (in row order, so the
        report is the same from run to run), and it gets no spectral analysis, which needs the
        whole matrix."""
        t0 = time.perf_counter()
        key = job.key
        record: dict[str, Any] | None = None
        gram = None
        analysis = None
        errors = []
        try:
            with torch.no_grad():
                if tuple(merged.shape) != tuple(job.taus.shape[1:]):
                    raise ValueError(f"merged shape {tuple(merged.shape)} != task shape {tuple(job.taus.shape[1:])}")
                gram = M.flat_gram(job.taus, merged)
            shape = list(job.taus.shape[1:]) if job.block is None else [job.block.rows, *job.taus.shape[2:]]
            record = {"key": key, "role": job.role.role.value, "shape": shape, "index": job.index,
                      "is_matrix": bool(job.is_matrix)}
        except Exception as e:  # never fail the merge
            errors.append({"key": key, "stage": "cheap", "error": f"{type(e).__name__}: {e}"})
        t1 = time.perf_counter()
        if record is not None and key in self._svd_set and job.is_matrix and job.block is not None and job.block.first:
            errors.append({"key": key, "stage": "svd", "error": "skipped: merged in row blocks (larger than the memory budget)"})
        if record is not None and key in self._svd_set and job.is_matrix and job.block is None and self.n_tasks >= 1:
            try:
                with torch.no_grad():
                    analysis = analyse_layer(job.taus, merged, method=self.method, params=self.params, role=job.role,
                                             n_top=self.n_top, profile_points=self.profile_points,
                                             hogsvd=key in self._hogsvd_set and self.n_tasks >= 2, hogsvd_pi=self.hogsvd_pi,
                                             hogsvd_common_tol=self.hogsvd_common_tol, hogsvd_max_dim=self.hogsvd_max_dim)
                analysis.update(key=key, role=job.role.role.value, index=job.index)
            except Exception as e:
                errors.append({"key": key, "stage": "svd", "error": f"{type(e).__name__}: {e}"})
                analysis = None
        with self._lock:
            if self._finished is not None:
                raise RuntimeError("DiagnosticsCollector.observe() after finish()")
            self._errors.extend(errors)
            self._cost["cheap"] += t1 - t0
            if record is not None and job.block is not None:
                parts = self._block_grams.setdefault(key, {})
                parts[job.block.start] = (job.block.stop, gram)
                if sum(stop - start for start, (stop, _) in parts.items()) == job.block.rows:
                    self._layers[key] = record
                    self._grams[key] = sum(g for _, (_, g) in sorted(self._block_grams.pop(key).items()))
            elif record is not None:
                self._layers[key] = record
                self._grams[key] = gram
            if analysis is not None:
                self._svd[key] = analysis
                self._cost["svd"] += analysis["cost_s"]["svd"]
                self._cost["hogsvd"] += analysis["cost_s"].get("hogsvd", 0.0)

    def rescale(self, factors: Mapping[str, float]) -> None:
        """Tell the collector that the engine multiplied τ_merged of some keys by a factor after
        ``observe`` (ESM's inter-layer scaling, ``MergeMethod.group_factors``). Norms, cosines to
        the merged vector and merged singular values in the report are adjusted; SAR, STI, stable
        and effective ranks are scale-invariant."""
        with self._lock:
            for k, f in factors.items():
                self._scale[k] = self._scale.get(k, 1.0) * float(f)

    # -- report ------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """The JSON-serialisable report (shape in the module docstring). Idempotent; ``observe``
        after ``finish`` is a caller bug and raises."""
        with self._lock:
            if self._finished is not None:
                return self._finished
            report = self._build()
            self._finished = report
            return report

    def _order(self, key: str, index: int) -> tuple[int, int]:
        return (index, self._plan_pos.get(key, -1))

    def _scaled_gram(self, key: str) -> torch.Tensor:
        g = self._grams[key]
        f = self._scale.get(key, 1.0)
        if f == 1.0:
            return g
        g = g.clone()
        g[-1, :-1] *= f
        g[:-1, -1] *= f
        g[-1, -1] *= f * f
        return g

    def _build(self) -> dict[str, Any]:
        names, t = self.expert_names, self.n_tasks
        keys = sorted(self._layers, key=lambda k: self._order(k, self._layers[k]["index"]))
        # ---- model-level geometry, streamed from the per-key Gram matrices
        total = torch.zeros((t + 1, t + 1), dtype=torch.float64)
        per_role: dict[str, torch.Tensor] = {}
        layers = []
        for k in keys:
            rec = self._layers[k]
            g = self._scaled_gram(k)
            total += g
            per_role.setdefault(rec["role"], torch.zeros_like(total)).add_(g)
            cos = M.cosine_from_gram(g)
            norms = g.diagonal().clamp_min(0).sqrt()
            mean_task_norm = float(norms[:t].mean()) if t else float("nan")
            layers.append({**rec, "task_norms": norms[:t].tolist(), "merged_norm": float(norms[t]),
                           "merged_over_mean_task_norm": float(norms[t]) / mean_task_norm if mean_task_norm > 0 else None,
                           "mean_pairwise_cosine": M.mean_off_diagonal(cos[:t, :t]),
                           "cosine_to_merged": cos[:t, t].tolist()})

        def geometry(g: torch.Tensor) -> dict[str, Any]:
            cos = M.cosine_from_gram(g)
            norms = g.diagonal().clamp_min(0).sqrt()
            return {"task_norms": dict(zip(names, norms[:t].tolist())), "merged_norm": float(norms[t]),
                    "cosine": cos[:t, :t].tolist(), "mean_pairwise_cosine": M.mean_off_diagonal(cos[:t, :t]),
                    "cosine_to_merged": dict(zip(names, cos[:t, t].tolist()))}

        model = geometry(total)
        model["per_role"] = {role: geometry(g) for role, g in sorted(per_role.items())}

        # ---- spectral layers
        svd_layers = []
        for k in sorted(self._svd, key=lambda k: self._order(k, self._svd[k]["index"])):
            a = dict(self._svd[k])
            f = self._scale.get(k, 1.0)
            if f != 1.0:
                spec = dict(a["spectra"])
                merged = dict(spec["merged"])
                merged.update(top=[v * abs(f) for v in merged["top"]], sigma_max=merged["sigma_max"] * abs(f),
                              frobenius=merged["frobenius"] * abs(f))
                prof = dict(spec["profile"])
                prof["merged"] = [v * abs(f) for v in prof["merged"]]
                spec.update(merged=merged, profile=prof)
                a["spectra"] = spec
                a["rescaled_by"] = f
            a.pop("cost_s", None)
            svd_layers.append(a)

        def layer_metrics(a: dict[str, Any]) -> dict[str, float | None]:
            sti = a["sti"]
            rc = a["rank_collapse"]
            return {
                "sar_mean": _mean(a["sar"]["sar"]),
                "sar_iso_mean": _mean(a["sar"]["sar_iso"]),
                "energy_kept_mean": _mean(a["energy_kept"]) if a["energy_kept"] else None,
                "sti_before": sti["before"], "sti_after": sti["after"],
                "sti_before_per_sigma": sti.get("before_per_sigma"), "sti_after_per_sigma": sti.get("after_per_sigma"),
                "erank_ratio": rc["erank_ratio"],
                "merged_effective_rank": rc["merged_effective_rank"],
                "task_effective_rank_mean": rc["task_effective_rank_mean"],
                "merged_fraction_below_1pct": rc["merged_fraction_below_1pct"],
                "merged_stable_rank": a["spectra"]["merged"]["stable_rank"],
                "task_stable_rank_mean": _mean(s["stable_rank"] for s in a["spectra"]["tasks"]),
            }

        per_layer = [(a["role"], layer_metrics(a)) for a in svd_layers]
        cheap = [(rec["role"], {"mean_pairwise_cosine": rec["mean_pairwise_cosine"],
                                "merged_over_mean_task_norm": rec["merged_over_mean_task_norm"]}) for rec in layers]

        def summarise(rows: list[tuple[str, dict[str, Any]]]) -> tuple[dict, dict]:
            overall, by_role = {}, {}
            metric_names = list(rows[0][1]) if rows else []
            for name in metric_names:
                overall[name] = _stats(r[name] for _, r in rows)
            for role in sorted({role for role, _ in rows}):
                sub = [r for ro, r in rows if ro == role]
                by_role[role] = {name: _stats(r[name] for r in sub) for name in metric_names}
            return overall, by_role

        o1, r1 = summarise(per_layer)
        o2, r2 = summarise(cheap)
        summary = {"overall": {**o2, **o1}, "per_role": {role: {**r2.get(role, {}), **r1.get(role, {})} for role in sorted(set(r1) | set(r2))}}

        def per_task(field: str) -> dict[str, float | None]:
            rows = [a["sar"][field] for a in svd_layers] if field in ("sar", "sar_iso") else [a[field] for a in svd_layers if a.get(field)]
            return {names[i]: _mean(row[i] for row in rows) for i in range(t)}

        per_task_summary = {"sar": per_task("sar"), "sar_iso": per_task("sar_iso"), "energy_kept": per_task("energy_kept")}

        hog = [a for a in svd_layers if "hogsvd" in a]
        hogsvd = None
        if hog:
            sims = torch.tensor([a["hogsvd"]["similarity"] for a in hog], dtype=torch.float64)
            hogsvd = {"layers": [a["key"] for a in hog], "similarity": sims.mean(0).tolist(),
                      "pi": self.hogsvd_pi, "common_tol": self.hogsvd_common_tol, "max_dim": self.hogsvd_max_dim,
                      "label": M.HOGSVD_LABEL,
                      "similarity_definition": "mean over the analysed layers of the cosine similarity of the task profiles "
                                               "p_{i,k} = σ_{i,k} / Σ_j σ_{j,k} over all generalized directions k"}

        observed_svd = [a["key"] for a in svd_layers]
        report = {
            "format": REPORT_FORMAT,
            "method": self.method,
            "params": self.params,
            "experts": names,
            "labels": {
                "merged": "τ_merged is the merged task vector before α (θ = θ0 + α·τ_merged)",
                "sti": M.STI_LABEL,
                "hogsvd": M.HOGSVD_LABEL,
                "sar": "ALGORITHMS.md §2.4 with the official off-by-one k_M kept and without the fig_3a.py basis bug "
                       "(U computed once per layer); merges with a flattened spectrum (Iso-C/CTS, ESM ESD layers, "
                       "Subspace Boosting) order directions by the task-vector sum (svd_layers[].sar.basis)",
                "rank_collapse": "erank_ratio = effective rank of τ_merged / mean effective rank of the task matrices; "
                                 "fraction of singular values below 1% of σ_1",
                "spectra": "singular values from float32/float64 small-side Gram eigendecompositions (in float32, values below "
                           "1e-3·σ_1 are reported as 0)",
            },
            "sampling": {
                "sampled": len(self.svd_keys) < len(self.plan_keys),
                "strategy": "evenly spread over the plan's 2-D matrix keys, stratified by name-inferred role",
                "matrix_keys": len(self.plan_keys),
                "sample_size_rule": "min(max_svd_layers, matrix_keys, max(min_svd_layers, ceil(svd_fraction * matrix_keys)))",
                "max_svd_layers": self.max_svd_layers, "svd_fraction": self.svd_fraction, "min_svd_layers": self.min_svd_layers,
                "svd_layers": list(self.svd_keys),
                "hogsvd_layers": list(self.hogsvd_keys),
                "analysed_svd_layers": observed_svd,
                "not_observed": [k for k in self.svd_keys if k not in self._svd],
                "cheap_statistics": "every merged key",
            },
            "model": model,
            "per_task": per_task_summary,
            "summary": summary,
            "layers": layers,
            "svd_layers": svd_layers,
            "hogsvd": hogsvd,
            "errors": list(self._errors),
            "cost_s": {**self._cost, "total": sum(self._cost.values())},
        }
        return _jsonable(report)

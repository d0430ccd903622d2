"""Render a merge-diagnostics report (``merging.diagnostics``, format ``submerge.diagnostics/1``)
as one self-contained HTML page: inline CSS, every plot a base64 PNG made with matplotlib's Agg
canvas (no pyplot global state, so it is safe in worker threads). Sections whose data the report
lacks are skipped.

``render_report_html(report) -> str``. Optional evaluation data, merged in by whoever evaluated
the model, is shown when present:

* ``report["evaluation"]["tasks"]``: per-task results, either ``{task: number}``,
  ``{task: {column: value, ...}}`` or ``[{"task": name, column: value, ...}, ...]``;
* ``report["evaluation"]["average"]``: a row of column means, shown under the table;
* ``report["evaluation"]["alpha_search"]``: ``{"chosen_alpha", "curve": [{"alpha", "avg_accuracy",
  "avg_normalized"}, ...]}`` as ``workers.pipeline`` writes it (or the older
  ``report["evaluation"]["alpha_curve"]``: ``[{"alpha": a, "score": s}, ...]``);
* ``report["evaluation"]["lambda_search"]``: consensus's per-expert TALL-mask λ, ``{"grid",
  "chosen_lambda": {expert: λ}, "validation_accuracy": {expert: [{"lambda", "accuracy"}, ...]}}``.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from typing import Any, Iterable

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:1.5em;margin:0 0 4px}h2{font-size:1.2em;margin:0 0 10px;border-bottom:1px solid #dde1e6;padding-bottom:4px}
section{background:#fff;border:1px solid #e1e4e8;border-radius:6px;padding:16px 20px;margin:16px 0}
table{border-collapse:collapse;font-size:.86em;margin:8px 0}th,td{border:1px solid #e1e4e8;padding:3px 8px;text-align:right}
th{background:#f0f2f5}td.l,th.l{text-align:left}
img{max-width:100%;height:auto;display:block;margin:8px 0}
.note{color:#5b6472;font-size:.85em}.warn{color:#9a3412}
code{background:#f0f2f5;padding:0 3px;border-radius:3px;font-size:.9em}
.grid{display:flex;flex-wrap:wrap;gap:12px}.grid>div{flex:1 1 420px}
"""


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------

def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return "–"
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}g}"
    return _esc(x)


def _num(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _mean(values: Iterable[Any]) -> float | None:
    v = [x for x in (_num(y) for y in values) if x is not None]
    return sum(v) / len(v) if v else None


def _positive(values: Iterable[Any]) -> list[float]:
    """Values for a log axis: zeros (σ below the resolution floor) and missing values become NaN gaps."""
    return [v if (v := _num(x)) is not None and v > 0 else float("nan") for x in values]


def _short(key: str, n: int = 42) -> str:
    """A layer key shortened for axis labels: drop common prefixes, keep the tail."""
    k = key.replace("transformer.resblocks.", "b").replace("model.layers.", "L").replace("encoder.layer.", "L")
    k = k.replace("visual.", "").replace(".weight", "").replace("_weight", "")
    return k if len(k) <= n else "…" + k[-(n - 1):]


def _figure(width: float, height: float, layout: str | None = "constrained"):
    try:  # lazy: matplotlib takes half a second to import, and only a report page needs it
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("render_report_html needs matplotlib (pip install matplotlib)") from e
    fig = Figure(figsize=(width, height), dpi=96, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _img(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.canvas.print_png(buf)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: Iterable[list[Any]], left: int = 1) -> str:
    out = ["<table><tr>" + "".join(f'<th class="{"l" if i < left else ""}">{_esc(h)}</th>' for i, h in enumerate(header)) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{_fmt(v) if i >= left else _esc(v)}</td>'
                                    for i, v in enumerate(row)) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _heatmap(matrix: list[list[Any]], labels: list[str], title: str, vmin: float | None = None, vmax: float = 1.0) -> str:
    n = len(matrix)
    vals = [[_num(v) if _num(v) is not None else float("nan") for v in row] for row in matrix]
    size = max(3.2, min(0.55 * n + 2.0, 9.0))
    fig = _figure(size + 0.9, size, layout=None)
    fig.subplots_adjust(left=1.1 / (size + 0.9), right=0.97, bottom=1.0 / size, top=1 - 0.35 / size)
    ax = fig.add_subplot()
    lo = vmin if vmin is not None else min(0.0, min((v for row in vals for v in row if math.isfinite(v)), default=0.0))
    im = ax.imshow(vals, cmap="viridis", vmin=lo, vmax=vmax)
    ax.set_xticks(range(n), labels=[_short(x, 14) for x in labels], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels=[_short(x, 14) for x in labels], fontsize=8)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                if math.isfinite(vals[i][j]):
                    ax.text(j, i, f"{vals[i][j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if vals[i][j] < (lo + vmax) / 2 else "black")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _img(fig, title)


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------

def _title(report: dict) -> str:
    return "Merge report" if isinstance(report.get("evaluation"), dict) else "Merge diagnostics"


def _header(report: dict) -> str:
    method = report.get("method", "?")
    experts = report.get("experts") or []
    samp = report.get("sampling") or {}
    cost = report.get("cost_s") or {}
    evaluated = isinstance(report.get("evaluation"), dict)
    parts = [f"<h1>{_title(report)}: <code>{_esc(method)}</code></h1>",
             f'<p class="note">{len(experts)} experts: {", ".join(_esc(e) for e in experts)}. '
             f'Format {_esc(report.get("format", "?"))}. '
             + ("Evaluation scored on each task's data; diagnostics are data-free (computed from the weights only).</p>"
                if evaluated else "Data-free: computed from the weights only.</p>")]
    if report.get("params"):
        parts.append(f'<p class="note">Parameters: <code>{_esc(json.dumps(report["params"], sort_keys=True))}</code></p>')
    if samp:
        analysed = samp.get("analysed_svd_layers") or samp.get("svd_layers") or []
        sampled = "a deterministic sample of" if samp.get("sampled") else "all"
        parts.append(f'<p class="note">Spectral analyses on {sampled} {len(analysed)} of {samp.get("matrix_keys", "?")} matrix '
                     f'layers ({_esc(samp.get("strategy", ""))}); HO-GSVD on {len(samp.get("hogsvd_layers") or [])}. '
                     f'Norms and cosines: {_esc(samp.get("cheap_statistics", "every key"))}.</p>')
    if cost:
        parts.append(f'<p class="note">Diagnostics cost: {_fmt(cost.get("total"))} s '
                     f'(cheap {_fmt(cost.get("cheap"))} s, spectral {_fmt(cost.get("svd"))} s, HO-GSVD {_fmt(cost.get("hogsvd"))} s).</p>')
    if report.get("errors"):
        parts.append('<p class="warn">Diagnostics skipped for: ' + "; ".join(
            f'{_esc(e.get("key"))} ({_esc(e.get("stage"))}: {_esc(e.get("error"))})' for e in report["errors"]) + "</p>")
    return "<header>" + "".join(parts) + "</header>"


def _similarity(report: dict) -> str:
    names = report.get("experts") or []
    model = report.get("model") or {}
    hog = report.get("hogsvd") or {}
    blocks = []
    if model.get("cosine"):
        blocks.append("<div>" + _heatmap(model["cosine"], names, "Cosine similarity of task vectors (whole model)", vmin=None)
                      + f'<p class="note">Mean pairwise cosine {_fmt(model.get("mean_pairwise_cosine"))}. '
                        "Accumulated from per-layer dot products and norms.</p></div>")
    if hog.get("similarity"):
        off = [_num(v) for i, row in enumerate(hog["similarity"]) for j, v in enumerate(row) if i != j and _num(v) is not None]
        lo = min(off) if off else 0.0
        blocks.append("<div>" + _heatmap(hog["similarity"], names, "HO-GSVD task similarity (colour range from the minimum)",
                                         vmin=lo if lo < 1.0 else 0.0)
                      + f'<p class="note">{_esc(hog.get("label", ""))}. {_esc(hog.get("similarity_definition", ""))}; '
                        f'π = {_fmt(hog.get("pi"))}; layers: {", ".join(_esc(_short(k)) for k in hog.get("layers", []))}.</p></div>')
    if not blocks:
        return ""
    rows = []
    cos_m = model.get("cosine_to_merged") or {}
    norms = model.get("task_norms") or {}
    per_task = report.get("per_task") or {}
    for n in names:
        rows.append([n, norms.get(n), cos_m.get(n), (per_task.get("sar") or {}).get(n), (per_task.get("sar_iso") or {}).get(n),
                     (per_task.get("energy_kept") or {}).get(n)])
    table = _table(["expert", "‖τ‖", "cos(τ, τ_merged)", "SAR", "SAR (Iso)", "energy kept"], rows)
    return ('<section id="similarity"><h2>Task similarity</h2><div class="grid">' + "".join(blocks) + "</div>"
            + table + '<p class="note">SAR and energy kept are means over the analysed layers.</p></section>')


def _spectra(report: dict) -> str:
    layers = [a for a in report.get("svd_layers") or [] if (a.get("spectra") or {}).get("profile")]
    if not layers:
        return ""
    cols = 4 if len(layers) > 4 else len(layers)
    rows = math.ceil(len(layers) / cols)
    from matplotlib.ticker import LogLocator, NullLocator  # lazy, as in _figure

    fig = _figure(3.0 * cols, 2.3 * rows, layout=None)  # constrained layout of many log axes is slow
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.5 / (2.3 * rows), top=1 - 0.35 / (2.3 * rows), wspace=0.28, hspace=0.45)
    for i, a in enumerate(layers):
        ax = fig.add_subplot(rows, cols, i + 1)
        prof = a["spectra"]["profile"]
        x = [j + 1 for j in prof["index"]]
        ax.set_title(_short(a.get("key", "?"), 34), fontsize=8)
        ax.tick_params(labelsize=7)
        values = [v for ys in [*(prof.get("tasks") or []), prof.get("merged") or []] for v in ys]
        if not any(_num(v) is not None and _num(v) > 0 for v in values):
            # e.g. a layer no expert changed (a frozen or unused pooler): nothing to draw on log axes
            ax.text(0.5, 0.5, "all singular values are 0\n(no expert changed this layer)", ha="center", va="center",
                    fontsize=7, transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        for t, ys in enumerate(prof.get("tasks") or []):
            ax.plot(x, _positive(ys), color="0.6", lw=0.8, label="tasks (before)" if t == 0 else None)
        if prof.get("merged"):
            ax.plot(x, _positive(prof["merged"]), color="C3", lw=1.8, label="merged (after)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(LogLocator(numticks=4))
            axis.set_minor_locator(NullLocator())
        if i == 0:
            ax.legend(fontsize=7)
    return ('<section id="spectra"><h2>Spectra before and after merging</h2>' + _img(fig, "singular value spectra")
            + '<p class="note">Singular values (log-log) of each task matrix (grey) and of the merged task vector '
              "(red), sampled at geometrically spaced indices.</p></section>")


def _sar_sti(report: dict) -> str:
    layers = report.get("svd_layers") or []
    if not layers:
        return ""
    labels = [_short(a.get("key", "?"), 30) for a in layers]
    x = list(range(len(layers)))
    fig = _figure(max(6.0, 0.45 * len(layers) + 3), 5.6)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    sar = [[v for v in ((a.get("sar") or {}).get("sar") or []) if _num(v) is not None] for a in layers]
    mean = [_mean(v) for v in sar]
    lo = [min(v) if v else None for v in sar]
    hi = [max(v) if v else None for v in sar]
    iso = [_mean((a.get("sar") or {}).get("sar_iso") or []) for a in layers]
    nan = float("nan")
    ax1.fill_between(x, [v if v is not None else nan for v in lo], [v if v is not None else nan for v in hi], color="C0", alpha=0.2, label="task range")
    ax1.plot(x, [v if v is not None else nan for v in mean], "o-", color="C0", label="SAR (mean over tasks)")
    ax1.plot(x, [v if v is not None else nan for v in iso], "s--", color="C2", label="SAR, Iso (flat spectrum)")
    ax1.set_ylim(0, 1.05)
    ax1.set_ylabel("SAR")
    ax1.legend(fontsize=7, loc="lower left")
    before = [_num((a.get("sti") or {}).get("before_per_sigma")) for a in layers]
    after = [_num((a.get("sti") or {}).get("after_per_sigma")) for a in layers]
    w = 0.4
    ax2.bar([i - w / 2 for i in x], [v or 0.0 for v in before], w, color="C1", label="STI before")
    ax2.bar([i + w / 2 for i in x], [v or 0.0 for v in after], w, color="C4", label="STI after")
    ax2.set_ylabel("STI / Σσ")
    ax2.legend(fontsize=7)
    ax2.set_xticks(x, labels=labels, rotation=60, ha="right", fontsize=7)
    sti_label = next(((a.get("sti") or {}).get("label") for a in layers if (a.get("sti") or {}).get("label")), "")
    rows = [[a.get("key"), (a.get("sar") or {}).get("k_M"), m, i, (a.get("sti") or {}).get("k"), (a.get("sti") or {}).get("before"),
             (a.get("sti") or {}).get("after")] for a, m, i in zip(layers, mean, iso)]
    return ('<section id="sar-sti"><h2>Subspace alignment (SAR) and singular task interference (STI) per layer</h2>'
            + _img(fig, "SAR and STI per layer")
            + _table(["layer", "k_M", "SAR mean", "SAR Iso mean", "STI k", "STI before", "STI after"], rows)
            + f'<p class="note">SAR: ‖U_kU_kᵀΔ_t‖/‖Δ_t‖ against the merged matrix (ALGORITHMS.md §2.4, official k_M). '
              f'STI: {_esc(sti_label)}; plotted divided by Σσ of the kept task factors.</p></section>')


def _energy_rank(report: dict) -> str:
    layers = report.get("svd_layers") or []
    if not layers:
        return ""
    x = list(range(len(layers)))
    labels = [_short(a.get("key", "?"), 30) for a in layers]
    erank = [_num((a.get("rank_collapse") or {}).get("erank_ratio")) for a in layers]
    small = [_num((a.get("rank_collapse") or {}).get("merged_fraction_below_1pct")) for a in layers]
    energy = [a.get("energy_kept") for a in layers]
    has_energy = any(e for e in energy)
    fig = _figure(max(6.0, 0.45 * len(layers) + 3), 3.4)
    ax = fig.add_subplot()
    nan = float("nan")
    ax.plot(x, [v if v is not None else nan for v in erank], "o-", color="C3", label="effective rank: merged / mean task")
    ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
    ax.set_ylabel("effective-rank ratio")
    ax.set_xticks(x, labels=labels, rotation=60, ha="right", fontsize=7)
    ax2 = ax.twinx()
    ax2.plot(x, [v if v is not None else nan for v in small], "^--", color="C7", label="merged: fraction of σ < 1% σ1")
    if has_energy:
        em = [_mean(e or []) for e in energy]
        ax2.plot(x, [v if v is not None else nan for v in em], "s-", color="C0", label="energy kept by truncation (mean)")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("fraction")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
    trunc = next((a.get("truncation") for a in layers if a.get("truncation")), None)
    note = f'Truncation rule: {_esc(trunc.get("rule"))}. ' if trunc else "The method does not truncate task matrices. "
    return ('<section id="rank"><h2>Truncation energy and rank collapse</h2>' + _img(fig, "energy kept and rank collapse")
            + f'<p class="note">{note}{_esc((report.get("labels") or {}).get("rank_collapse", ""))}.</p></section>')


def _summary(report: dict) -> str:
    summ = (report.get("summary") or {}).get("overall") or {}
    rows = [[name, s.get("mean"), s.get("median"), s.get("min"), s.get("max"), s.get("n")] for name, s in summ.items() if s]
    if not rows:
        return ""
    out = '<section id="summary"><h2>Summary over the model</h2>' + _table(["metric", "mean", "median", "min", "max", "n"], rows)
    per_role = (report.get("summary") or {}).get("per_role") or {}
    metric_order = [name for name, s in summ.items() if s]
    if per_role:
        header = ["role"] + metric_order
        prow = [[role] + [((vals.get(m) or {}).get("mean")) for m in metric_order] for role, vals in per_role.items()]
        out += '<p class="note">Per role (means):</p>' + _table(header, prow)
    return out + "</section>"


def _task_rows(tasks: Any) -> tuple[list[str], list[list[Any]]]:
    """Normalise the accepted shapes of ``evaluation.tasks`` into (columns, rows)."""
    items: list[tuple[str, dict]] = []
    if isinstance(tasks, dict):
        for name, v in tasks.items():
            items.append((str(name), v if isinstance(v, dict) else {"score": v}))
    elif isinstance(tasks, list):
        for i, v in enumerate(tasks):
            if isinstance(v, dict):
                name = v.get("task", v.get("name", f"task{i}"))
                items.append((str(name), {k: x for k, x in v.items() if k not in ("task", "name")}))
    cols: list[str] = []
    for _, v in items:
        for k in v:
            if k not in cols:
                cols.append(k)
    return cols, [[name] + [v.get(c) for c in cols] for name, v in items]


def _evaluation(report: dict) -> str:
    ev = report.get("evaluation")
    if not isinstance(ev, dict):
        return ""
    parts = []
    cols, rows = _task_rows(ev.get("tasks"))
    if rows:
        avg = ev.get("average")
        table_rows = list(rows)
        if isinstance(avg, dict) and avg:
            table_rows.append(["average"] + [avg.get(c) if c in avg else "" for c in cols])
        parts.append(_table(["task"] + cols, table_rows))
        if isinstance(avg, dict) and avg:
            parts.append('<p class="note">normalized = merged / expert accuracy; NAI = (merged − base) / (expert − base); '
                         'base = the base model (zero-shot), expert = each task\'s own fine-tuned model.</p>')
        series = [c for c in ("base", "merged", "expert_accuracy") if c in cols]
        numeric = [c for i, c in enumerate(cols) if any(_num(r[i + 1]) is not None for r in rows)]
        if series:
            fig = _figure(max(5.5, 0.8 * len(rows) + 2), 3.2)
            ax = fig.add_subplot()
            width = 0.8 / len(series)
            for j, c in enumerate(series):
                ci = cols.index(c) + 1
                ax.bar([i + (j - (len(series) - 1) / 2) * width for i in range(len(rows))],
                       [_num(r[ci]) or 0.0 for r in rows], width, label={"expert_accuracy": "expert"}.get(c, c), color=f"C{j}")
            ax.set_xticks(range(len(rows)), labels=[_short(r[0], 16) for r in rows], rotation=45, ha="right", fontsize=8)
            ax.set_ylabel("accuracy")
            ax.legend(fontsize=8)
            ax.set_title("Per-task accuracy", fontsize=10)
            parts.append(_img(fig, "per-task accuracy"))
        elif numeric:
            col = next((c for c in numeric if "acc" in c.lower() or c == "score"), numeric[0])
            ci = cols.index(col) + 1
            fig = _figure(max(5.0, 0.5 * len(rows) + 2), 3.0)
            ax = fig.add_subplot()
            ax.bar(range(len(rows)), [_num(r[ci]) or 0.0 for r in rows], color="C0")
            ax.set_xticks(range(len(rows)), labels=[_short(r[0], 16) for r in rows], rotation=45, ha="right", fontsize=8)
            ax.set_ylabel(col)
            ax.set_title(f"Per-task {col}", fontsize=10)
            parts.append(_img(fig, f"per-task {col}"))
    search = ev.get("alpha_search")
    if isinstance(search, dict) and isinstance(search.get("curve"), list):
        pts = sorted((_num(p.get("alpha")), _num(p.get("avg_accuracy")), _num(p.get("avg_normalized")))
                     for p in search["curve"] if isinstance(p, dict) and _num(p.get("alpha")) is not None)
        if pts:
            fig = _figure(5.5, 3.2)
            ax = fig.add_subplot()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="C0", ms=3, label="mean accuracy")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], "s-", color="C2", ms=3, label="mean normalized accuracy")
            chosen = _num(search.get("chosen_alpha"))
            if chosen is not None:
                ax.axvline(chosen, color="C3", ls="--", label=f"chosen α = {chosen:g}")
            ax.set_xlabel("α (θ = θ0 + α·τ_merged)")
            ax.set_ylabel("validation score")
            ax.legend(fontsize=8)
            ax.set_title("α search on validation data", fontsize=10)
            parts.append(_img(fig, "alpha curve"))
            kind = (search.get("search") or {}).get("kind", "")
            parts.append(f'<p class="note">α search: {_esc(kind)}, {len(pts)} points evaluated; the chosen α maximises '
                         'the mean normalized accuracy among them.</p>')
    tall = ev.get("lambda_search")
    if isinstance(tall, dict) and isinstance(tall.get("validation_accuracy"), dict) and isinstance(tall.get("grid"), list):
        grid = tall["grid"]
        chosen = tall.get("chosen_lambda") or {}
        rows = []
        for expert, points in tall["validation_accuracy"].items():
            acc = {p.get("lambda"): p.get("accuracy") for p in points if isinstance(p, dict)}
            rows.append([expert, chosen.get(expert), *(acc.get(lam) for lam in grid)])
        parts.append("<h3>TALL-mask λ per expert</h3>" + _table(["expert", "chosen λ", *(f"λ = {lam:g}" for lam in grid)], rows)
                     + '<p class="note">Validation accuracy of θ0 + m_t(λ) ⊙ Σ τ on each expert\'s task; the first best λ is '
                       'kept (the official TALL-mask step).</p>')
    curve = [(_num(p.get("alpha")), _num(p.get("score"))) for p in ev.get("alpha_curve") or [] if isinstance(p, dict)]
    curve = sorted((a, s) for a, s in curve if a is not None and s is not None)
    if curve:
        fig = _figure(5.5, 3.2)
        ax = fig.add_subplot()
        ax.plot([a for a, _ in curve], [s for _, s in curve], "o-", color="C2")
        best = max(curve, key=lambda p: p[1])
        ax.plot([best[0]], [best[1]], "*", color="C3", ms=14, label=f"best α = {best[0]:g} ({best[1]:.4g})")
        ax.set_xlabel("α (θ = θ0 + α·τ_merged)")
        ax.set_ylabel("score")
        ax.legend(fontsize=8)
        ax.set_title("α curve", fontsize=10)
        parts.append(_img(fig, "alpha curve"))
    if not parts:
        return ""
    return '<section id="evaluation"><h2>Evaluation</h2>' + "".join(parts) + "</section>"


def render_report_html(report: dict) -> str:
    """One self-contained HTML page for a diagnostics report (sections without data are skipped)."""
    body = [_header(report)]
    for section in (_evaluation, _similarity, _spectra, _sar_sti, _energy_rank, _summary):  # results first
        try:
            body.append(section(report))
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as e:  # a malformed section must not sink the page
            body.append(f'<section><p class="warn">Section {section.__name__.strip("_")} could not be drawn: {_esc(e)}</p></section>')
    labels = report.get("labels") or {}
    if labels:
        body.append('<section id="notes"><h2>Notes</h2><ul>' + "".join(f"<li><b>{_esc(k)}</b>: {_esc(v)}</li>" for k, v in labels.items())
                    + "</ul></section>")
    title = f"{_title(report)}: {report.get('method', '?')}"
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body><main>" + "".join(body) + "</main></body></html>")


__all__ = ["render_report_html"]

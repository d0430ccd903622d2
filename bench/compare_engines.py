#!/usr/bin/env python3
"""The same merge with two or more engines, alternating, medians: a change's before and after.

    git worktree add /tmp/before <commit>          # the engine to compare against
    .venv/bin/python bench/compare_engines.py --engine before=/tmp/before --engine after=. \\
        [--engine after+scipy=.:bench/lapack_scipy.py] --methods iso_c,tsv_m,esm --repeat 3

Each run is a fresh process: ``bench/timed_merge.py`` of that checkout on the 12-block synthetic
set (``bench/make_synthetic.py --calibration``), diagnostics off, on the CPU. An engine given as
``PATH:MODULE`` first runs MODULE (a file that patches the engine in-process, e.g. swapping the
LAPACK bindings). Rounds go engine after engine and method after method, so slow periods of the
VM hit every engine alike. Prints each run as it finishes, then the medians as a markdown table.
"""
from __future__ import annotations

import argparse
import os
import re
import runpy
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, ".cache", "synthetic", "vitb16_b12_s0")


def _patched_run(module: str, checkout: str, argv: list[str]) -> None:
    """In the child: put the checkout first on the path, run the patch module, then timed_merge."""
    sys.path.insert(0, checkout)
    runpy.run_path(module)
    sys.argv = [os.path.join(checkout, "bench", "timed_merge.py"), *argv]
    runpy.run_path(sys.argv[0], run_name="__main__")


def run_once(checkout: str, patch: str | None, data: str, method: str) -> dict:
    argv = [data, method, "off", "cpu"]
    if patch:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", checkout, os.path.abspath(patch), *argv]
    else:
        cmd = [sys.executable, os.path.join(checkout, "bench", "timed_merge.py"), *argv]
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True)
    wall = time.perf_counter() - t
    merge = re.search(r"merge_wall=([\d.]+)s", r.stdout)
    rss = re.search(r"maxrss=(\d+)MB", r.stdout)
    if r.returncode or not merge:
        raise SystemExit(f"{checkout} {method} failed:\n{r.stderr[-3000:]}")
    return {"wall": wall, "merge": float(merge.group(1)), "rss": int(rss.group(1))}


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        _patched_run(sys.argv[3], sys.argv[2], sys.argv[4:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", action="append", required=True, help="NAME=CHECKOUT[:PATCH_MODULE]")
    ap.add_argument("--methods", default="iso_c,tsv_m,esm")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data", default=DATA)
    args = ap.parse_args(argv)
    engines = {}
    for spec in args.engine:
        name, _, where = spec.partition("=")
        checkout, _, patch = where.partition(":")
        engines[name] = (os.path.abspath(checkout), patch or None)
    runs: dict[tuple[str, str], list[dict]] = {}
    for rep in range(args.repeat):
        for method in args.methods.split(","):
            for name, (checkout, patch) in engines.items():
                row = run_once(checkout, patch, args.data, method)
                runs.setdefault((method, name), []).append(row)
                print(rep, method, name, row, flush=True)
    print("\n| method | engine | merge phase, median (range) | whole command | peak RSS |\n|---|---|---|---:|---:|")
    for (method, name), rows in runs.items():
        merge = [r["merge"] for r in rows]
        print(f"| {method} | {name} | {statistics.median(merge):.1f} s ({min(merge):.1f}–{max(merge):.1f}) | "
              f"{statistics.median(r['wall'] for r in rows):.1f} s | {statistics.median(r['rss'] for r in rows):.0f} MB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Run one submerge merge on a synthetic config (one process per measurement; see run_bench.py).

Prints one JSON line (prefixed ``RESULT``) with the engine's own phase timings. With
``--profile FILE`` the merge runs under cProfile and the stats are dumped to FILE.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

T_START = time.perf_counter()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --engine-dir DIR: import `merging` from DIR (a snapshot of one commit) instead of the working tree.
if "--engine-dir" in sys.argv:
    ROOT = sys.argv[sys.argv.index("--engine-dir") + 1]
sys.path.insert(0, ROOT)

import merging  # noqa: E402


def build_spec(method: str, params: dict, data: str, experts: int, out: str, calibration: bool) -> dict:
    ex = []
    for t in range(experts):
        ref = {"uri": os.path.join(data, f"expert{t}.safetensors"), "name": f"task{t}"}
        if calibration:
            ref["calibration"] = {"uri": os.path.join(data, "calib", f"expert{t}.safetensors")}
        ex.append(ref)
    return {
        "method": method,
        "params": params,
        "base": {"uri": os.path.join(data, "base.safetensors")},
        "experts": ex,
        "output": {"uri": out, "overwrite": True},
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", required=True)
    ap.add_argument("--params", default="{}")
    ap.add_argument("--data", required=True)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--out", required=True)
    ap.add_argument("--calibration", action="store_true")
    ap.add_argument("--options", default="{}", help="spec options JSON, e.g. '{\"workers\": 1}'")
    ap.add_argument("--profile")
    ap.add_argument("--engine-dir", help="directory holding the merging package to benchmark (default: this checkout)")
    args = ap.parse_args()
    t_import = time.perf_counter() - T_START
    spec = build_spec(args.method, json.loads(args.params), args.data, args.experts, args.out, args.calibration)
    if json.loads(args.options):
        spec["options"] = json.loads(args.options)
    t0 = time.perf_counter()
    if args.profile:
        import cProfile
        prof = cProfile.Profile()
        result = prof.runcall(merging.merge, spec)
        prof.dump_stats(args.profile)
    else:
        result = merging.merge(spec)
    t_merge = time.perf_counter() - t0
    print("RESULT " + json.dumps({"engine": os.path.dirname(os.path.abspath(merging.__file__)), "import_s": t_import, "merge_call_s": t_merge,
                                  "engine_timings_s": {k: round(v, 3) for k, v in result.timings.items()},
                                  "notes": result.manifest.get("notes")}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Profile one submerge merge end to end: torch operator self-times (torch.profiler) and the
Python functions that spend them (cProfile), with one merge worker and one torch thread so
every op is seen and the times are CPU seconds.

    .venv/bin/python bench/profile_engine.py --method tsv_m [--blocks 1] [--experts 8] [--top 15]

Writes bench/out/profiles/<method>_b<blocks>_T<experts>.{txt,json}.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
if "--engine-dir" in sys.argv:  # a snapshot of merging/ (see run_bench.py --engine head)
    sys.path.insert(0, sys.argv[sys.argv.index("--engine-dir") + 1])
sys.path.insert(0, HERE)

import torch  # noqa: E402

import make_synthetic  # noqa: E402
import merging  # noqa: E402
from ours_runner import build_spec  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", required=True)
    ap.add_argument("--params", default=None)
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--options", default='{"workers": 1}', help="spec options (JSON); one worker so every op is on this thread")
    ap.add_argument("--engine-dir")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from merging import get_method
    calib = get_method(args.method).needs_calibration
    data = make_synthetic.ensure(args.blocks, args.experts, calibration=calib, verbose=False)
    params = json.loads(args.params) if args.params else ({"alpha": 1.0} if args.method in ("tsv_m", "iso_c", "iso_cts") else {})
    out = os.path.join(HERE, "out", "merged", f"profile_{args.method}")
    spec = build_spec(args.method, params, data, args.experts, out, calib)
    spec["options"] = json.loads(args.options)

    prof = cProfile.Profile()
    t = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as tp:
        result = prof.runcall(merging.merge, spec)
    wall = time.perf_counter() - t

    name = f"{args.method}_b{args.blocks}_T{args.experts}" + ("_" + "_".join(f"{k}-{v}" for k, v in json.loads(args.options).items() if k != "workers") if json.loads(args.options) else "")
    os.makedirs(os.path.join(HERE, "out", "profiles"), exist_ok=True)
    ops = tp.key_averages()
    by_op = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self = sum(e.self_cpu_time_total for e in ops) / 1e6
    lines = [f"engine {os.path.dirname(merging.__file__)}", f"{name}: wall {wall:.2f}s under profilers (1 worker, {args.threads} torch thread(s)); engine timings "
             + json.dumps({k: round(v, 2) for k, v in result.timings.items()}),
             f"torch ops self CPU total {total_self:.2f}s; top ops:"]
    for e in by_op[: args.top]:
        lines.append(f"  {e.key:<32} {e.self_cpu_time_total / 1e6:8.2f}s  {100 * e.self_cpu_time_total / 1e6 / total_self:5.1f}%  calls {e.count}")
    by_shape = sorted(tp.key_averages(group_by_input_shape=True), key=lambda e: e.self_cpu_time_total, reverse=True)
    lines.append("top (op, input shapes):")
    for e in by_shape[: args.top]:
        lines.append(f"  {e.key:<22} {str(e.input_shapes)[:90]:<90} {e.self_cpu_time_total / 1e6:7.2f}s calls {e.count}")
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(r"merging", args.top + 10)
    lines.append("cProfile, merging/ functions by cumulative time:")
    lines += ["  " + ln for ln in s.getvalue().splitlines() if ln.strip() and ("merging" in ln or "ncalls" in ln)]
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(HERE, "out", "profiles", name + ".txt"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(HERE, "out", "profiles", name + ".json"), "w") as f:
        json.dump({"wall_s": wall, "timings": result.timings, "torch_self_total_s": total_self,
                   "ops": [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in by_op[:40]]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Time one merge of the synthetic checkpoints in this process (the numbers in RESULTS.md's
"clean" tables): ``python bench/timed_merge.py DATA_DIR METHOD [off|sampled|full] [cpu|cuda|auto] [WORKERS]``
(WORKERS: ``options.workers``; default the engine's).

Run it under ``taskset -c 0-1`` to pin it to two cores. Prints the merge's wall time, the engine's
phase timings and the process's peak RSS.
"""
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import merging  # noqa: E402

data, method = sys.argv[1], sys.argv[2]
diag = sys.argv[3] if len(sys.argv) > 3 else "off"
device = sys.argv[4] if len(sys.argv) > 4 else "auto"
workers = int(sys.argv[5]) if len(sys.argv) > 5 else None
experts = [{"uri": f"{data}/expert{t}.safetensors",
            **({"calibration": {"uri": f"{data}/calib/expert{t}.safetensors"}} if method == "esm" else {})} for t in range(8)]
spec = {"method": method, "base": {"uri": f"{data}/base.safetensors"}, "experts": experts,
        "output": {"uri": f"/tmp/submerge_bench_{method}", "overwrite": True},
        "options": {"device": device, "diagnostics": diag, **({"workers": workers} if workers else {})}}
t = time.perf_counter()
result = merging.merge(spec)
wall = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(f"{device} {method} diagnostics={diag} merge_wall={wall:.1f}s "
      f"phases={ {k: round(v, 1) for k, v in result.timings.items()} } maxrss={rss}MB", flush=True)

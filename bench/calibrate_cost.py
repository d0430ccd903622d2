#!/usr/bin/env python3
"""Fit the preflight's cost model (merging/cost.py) on this machine and write merging/cost_model.json.

    .venv/bin/python bench/calibrate_cost.py                 # every method, llama_small (4 experts)
    .venv/bin/python bench/calibrate_cost.py --check llama8b  # compare estimates with measured merges

Inputs: ``bench/llm/make_llm.py --set llama_small`` (hidden 1024, MLP 2816, vocabulary 8000, 4 layers,
fp32, 4 experts; generated when missing). Each method merges them in this process through
``merging.merge`` (diagnostics off, default workers), median of ``--repeat`` runs:

* startup: the engine's own inspect + finalize time (headers, plan, card), median over all runs;
* read / write rates: ``cat`` of every input file from the page cache, and writing + fsyncing +
  hashing a file of the output's size;
* a method's constant: its merge-pass time × workers (the small set is compute-bound: every input is
  in the page cache) divided by its work units (``merging.cost.work_units``); for an SVD method the
  mean-merged keys are charged at weight averaging's rate and the rest goes to its matrices.

``--check SET`` merges SET with the methods given and prints estimated against measured wall times.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(HERE, "llm"))

import make_llm  # noqa: E402

import merging  # noqa: E402
from merging.cost import MODEL_FILE, CostModel, work_units  # noqa: E402
from merging.io.sources import IOConfig  # noqa: E402
from merging.plan import preflight, prepare  # noqa: E402

METHODS = {  # model key -> (method, params)
    "weight_average": ("weight_average", {}),
    "task_arithmetic": ("task_arithmetic", {}),
    "ties": ("ties", {}),
    "dare": ("dare", {}),
    "consensus": ("consensus", {}),
    "breadcrumbs": ("breadcrumbs", {}),
    "tsv_m": ("tsv_m", {}),
    "iso_c": ("iso_c", {}),
    "iso_cts": ("iso_cts", {}),
    "task_arithmetic+subspace_boosting": ("task_arithmetic", {"subspace_boosting": {"beta": 0.01}}),
}


def spec_for(data: dict, method: str, params: dict, out: str, budget: str | None = None) -> dict:
    options = {"diagnostics": "off", "device": "cpu"}
    if budget:
        options["memory_budget"] = budget
    return {"method": method, "params": params, "base": {"uri": data["base"]},
            "experts": [{"uri": e, "name": f"e{i}"} for i, e in enumerate(data["expert_dirs"])],
            "output": {"uri": out, "overwrite": True, **({"dtype": "bfloat16"} if data["set"] == "llama8b" else {})},
            "options": options}


def input_files(data: dict) -> list[str]:
    out = []
    for d in [data["base"], *data["expert_dirs"]]:
        out += [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".safetensors")]
    return out


def read_rate(files: list[str]) -> float:
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)  # into the page cache
    t0 = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return sum(os.path.getsize(f) for f in files) / (time.perf_counter() - t0)


def write_rate(nbytes: int, directory: str) -> float:
    chunk = bytes(range(256)) * (64 << 12)
    path = os.path.join(directory, "write-rate.bin")
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            left -= f.write(chunk[:min(len(chunk), left)])
        f.flush()
        os.fsync(f.fileno())
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    dt = time.perf_counter() - t0
    os.remove(path)
    return nbytes / dt


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    return f"{cpu}, {len(os.sched_getaffinity(0))} CPUs, {_dt.date.today().isoformat()}, commit {commit}"


def fit(args) -> int:
    data = make_llm.ensure_set(args.set)
    work = tempfile.mkdtemp(prefix="calibrate-", dir=os.path.join(ROOT, "bench", ".cache"))
    files = input_files(data)
    startups, fitted_e, fitted_m, lines = [], {}, {}, []
    out_bytes = None
    for key, (method, params) in METHODS.items():
        if args.methods and key not in args.methods:
            continue
        spec = spec_for(data, method, params, os.path.join(work, key))
        pf = preflight(spec)
        prepared = prepare(pf.spec, IOConfig())
        prepared.close()
        units = work_units(prepared.plan, prepared.method, len(data["expert_dirs"]))
        out_bytes = units.write_bytes
        merges = []
        for _ in range(args.repeat):
            r = merging.merge(spec)
            t = r.timings
            startups.append(t.get("inspect", 0.0) + t.get("finalize", 0.0))
            merges.append(sum(v for k, v in t.items() if k == "merge" or k.startswith("prepass")))
        compute = statistics.median(merges) * pf.memory.workers
        if units.matrix:
            fitted_m[key] = (compute - units.elementwise * fitted_e.get("weight_average", 0.0)) / units.matrix
            fitted_e[key] = fitted_e.get("weight_average", 0.0)
        else:
            fitted_e[key] = compute / units.elementwise
        lines.append(f"{key}: merge pass {statistics.median(merges):.2f} s (runs {', '.join(f'{m:.2f}' for m in merges)}), "
                     f"{pf.memory.workers} workers")
        print(lines[-1], flush=True)
    model = CostModel(device="cpu", measured=machine(), startup_s=round(statistics.median(startups), 3),
                      read_bytes_per_s=round(read_rate(files)), write_bytes_per_s=round(write_rate(out_bytes, work)),
                      elementwise_s={k: float(f"{v:.4g}") for k, v in fitted_e.items()},
                      matrix_s={k: float(f"{v:.4g}") for k, v in fitted_m.items()})
    os.rmdir(work) if not os.listdir(work) else subprocess.run(["rm", "-rf", work], check=True)
    with open(args.out, "w") as f:
        json.dump(model.to_json(), f, indent=2)
        f.write("\n")
    print(json.dumps(model.to_json(), indent=2))
    return 0


def check(args) -> int:
    """Estimated against measured wall time of the engine (``timings['total']``) on another set."""
    data = make_llm.ensure_set(args.check)
    work = tempfile.mkdtemp(prefix="check-", dir=os.path.join(ROOT, "bench", ".cache"))
    for key in args.methods or ["task_arithmetic"]:
        method, params = METHODS[key]
        spec = spec_for(data, method, params, os.path.join(work, key), args.budget)
        pf = preflight(spec)
        est = pf.cost
        r = merging.merge(spec)
        print(f"{args.check} {key}: estimated {est.get('estimated_wall_s')} s {est.get('parts_s')}, "
              f"measured {r.timings['total']:.1f} s", flush=True)
        subprocess.run(["rm", "-rf", os.path.join(work, key)], check=True)
    os.rmdir(work)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="llama_small")
    ap.add_argument("--methods", type=lambda s: s.split(","), default=None, help="model keys (default: all)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=MODEL_FILE)
    ap.add_argument("--check", default=None, help="a make_llm set to compare estimates with measured merges on")
    ap.add_argument("--budget", default=None, help="options.memory_budget for --check")
    args = ap.parse_args()
    return check(args) if args.check else fit(args)


if __name__ == "__main__":
    sys.exit(main())

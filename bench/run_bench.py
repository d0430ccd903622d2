#!/usr/bin/env python3
"""Performance benchmark: submerge vs FusionBench on synthetic open_clip ViT-B/16 checkpoints.

    .venv/bin/python bench/run_bench.py                 # everything, --repeat 3 (what `make bench` runs)
    .venv/bin/python bench/run_bench.py --repeat 1 --configs b3_T8 --methods tsv_m,iso_c

Every measurement is a fresh process (``bench/ours_runner.py`` with this interpreter, or
``bench/fusionbench_runner.py`` with ``bench/.cache/fb-venv/bin/python``). Wall time is the whole
command (interpreter start, imports, reading, merging, writing the output); peak RSS is that
child's ``ru_maxrss`` from ``os.wait4``. Before each run the script waits (up to --max-wait s)
until the machine is idle, and it records the CPU time other processes used during the run
("bg", in cores) so contended runs are visible. The repeats are interleaved (all jobs once,
then all again) and the table shows medians. With --warm-inputs, every input file of a run is
read once just before it starts (outside the timed window, for both implementations): this VM
keeps little in its page cache (FusionBench's 4.5 GB runs push our inputs out), and reading the
3.1 GB of the 12-block inputs from its virtual disk adds ~3 s to the run that comes next (not
the whole of the slowdown after a FusionBench run: bench/RESULTS.md, 2026-11-23 at fe5f6ef).

Configurations (data from ``bench/make_synthetic.py``, generated when missing):
  b12_T8  12 blocks x 8 experts (main; every method, FusionBench TSV-M / Iso-C / Iso-CTS)
  b12_T4  12 blocks x 4 experts  \\
  b6_T8    6 blocks x 8 experts   > RSS / time scaling (--scaling-methods)
  b3_T8    3 blocks x 8 experts  /  (FusionBench here too with --fb-scaling-repeat, default 1)

Outputs: ``bench/out/results.json`` (every run and the summaries), merged models under
``bench/out/merged/`` (overwritten), runner logs under ``bench/out/logs/``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import make_synthetic  # noqa: E402

OUT = os.path.join(HERE, "out")
FB_VENV = os.path.join(HERE, ".cache", "fb-venv")
FB_PY = os.path.join(FB_VENV, "bin", "python")
CONFIGS = {"b12_T8": (12, 8), "b12_T4": (12, 4), "b6_T8": (6, 8), "b3_T8": (3, 8)}
MAIN = "b12_T8"
FB_METHODS = ("tsv_m", "iso_c", "iso_cts")
TOLERANCE = {"tsv_m": 6e-3, "iso_c": 4e-3, "iso_cts": 4e-3}  # ALGORITHMS.md §9, relative to max|ref|
HZ = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------- machine
def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "mem_gib": round(mem / 2**30, 1),
            "python": platform.python_version(), "kernel": platform.release()}


def git_state() -> dict:
    def git(*a):
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "merging_dirty": bool(git("status", "--porcelain", "--", "merging"))}


def engine_rev() -> str:
    """HEAD plus a hash of uncommitted changes under merging/ (others edit it while we measure)."""
    import hashlib
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    diff = subprocess.run(["git", "diff", "HEAD", "--", "merging"], cwd=REPO, capture_output=True).stdout
    return head + ("+" + hashlib.sha1(diff).hexdigest()[:8] if diff else "")


def _cpu_busy_s() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / HZ


def busy_cores(interval: float = 1.0) -> float:
    a = _cpu_busy_s()
    time.sleep(interval)
    return (_cpu_busy_s() - a) / interval


def wait_quiet(threshold: float, max_wait: float) -> float:
    """Wait until other processes use < threshold cores (3 s window); return the last reading."""
    deadline = time.monotonic() + max_wait
    load = busy_cores(3.0)
    announced = False
    while load >= threshold and time.monotonic() < deadline:
        if not announced:
            print(f"    (machine busy: {load:.2f} cores in use; waiting up to {max_wait:.0f}s)", flush=True)
            announced = True
        load = busy_cores(3.0)
    return load


# --------------------------------------------------------------------------------------- running
def warm_inputs(cfg: str, calibration: bool) -> float:
    """Read every input file of a run on ``cfg`` (base, experts, calibration if used) so that it
    starts with them in the page cache; returns the seconds it took."""
    blocks, T = CONFIGS[cfg]
    data = make_synthetic.config_dir(blocks, 0)
    names = ["base.safetensors", *(f"expert{t}.safetensors" for t in range(T))]
    if calibration:
        names += [os.path.join("calib", f"expert{t}.safetensors") for t in range(T)]
    t0 = time.perf_counter()
    buf = bytearray(8 << 20)
    for name in names:
        with open(os.path.join(data, name), "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def measure(cmd: list[str], log_path: str, env: dict | None = None) -> dict:
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        busy0 = _cpu_busy_s()
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        busy1 = _cpu_busy_s()
    p.returncode = os.waitstatus_to_exitcode(status)
    child_cpu = ru.ru_utime + ru.ru_stime
    result = {"wall_s": round(wall, 3), "peak_rss_mb": round(ru.ru_maxrss / 1024, 1), "rc": p.returncode,
              "cpu_s": round(child_cpu, 2), "bg_cores": round(max(0.0, (busy1 - busy0 - child_cpu) / wall), 2),
              "log": os.path.relpath(log_path, REPO)}
    with open(log_path) as f:
        text = f.read()
    for line in text.splitlines():
        if line.startswith("RESULT "):
            result["child"] = json.loads(line[len("RESULT "):])
    if p.returncode != 0 and "child" not in result:
        result["error"] = "\n".join(text.strip().splitlines()[-5:])
    return result


def our_jobs(selected: list[str] | None) -> list[dict]:
    from merging import get_method, method_names
    jobs = []
    for m in method_names():
        params = {"alpha": 1.0} if m in FB_METHODS else {}
        jobs.append({"label": m, "method": m, "params": params, "calibration": get_method(m).needs_calibration})
        if m == "task_arithmetic":
            jobs.append({"label": "task_arithmetic+sb", "method": m, "params": {"subspace_boosting": {}}, "calibration": False})
    if selected:
        unknown = set(selected) - {j["label"] for j in jobs}
        if unknown:
            raise SystemExit(f"unknown method label(s): {sorted(unknown)}; known: {[j['label'] for j in jobs]}")
        jobs = [j for j in jobs if j["label"] in selected]
    return jobs


ENGINE_DIR: str | None = None  # set by --engine head: a snapshot of merging/ at HEAD


def snapshot_engine() -> tuple[str, str]:
    """Export merging/ at HEAD to bench/.cache/engine/<commit>/ (others edit the working tree while we measure)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    dest = os.path.join(HERE, ".cache", "engine", commit)
    if not os.path.exists(os.path.join(dest, "merging", "__init__.py")):
        os.makedirs(dest, exist_ok=True)
        archive = subprocess.run(["git", "archive", "HEAD", "merging"], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return dest, commit


def run_ours(job: dict, cfg: str, rep: int, profile: bool = False, options: str = "{}") -> dict:
    blocks, T = CONFIGS[cfg]
    data = make_synthetic.config_dir(blocks, 0)
    out = os.path.join(OUT, "merged", cfg, job["label"])
    cmd = [sys.executable, os.path.join(HERE, "ours_runner.py"), "--method", job["method"], "--params", json.dumps(job["params"]),
           "--data", data, "--experts", str(T), "--out", out]
    if job["calibration"]:
        cmd.append("--calibration")
    if json.loads(options):
        cmd += ["--options", options]
    if ENGINE_DIR:
        cmd += ["--engine-dir", ENGINE_DIR]
    if profile:
        cmd += ["--profile", os.path.join(OUT, "profiles", f"{cfg}_{job['label']}.prof")]
        os.makedirs(os.path.join(OUT, "profiles"), exist_ok=True)
    r = measure(cmd, os.path.join(OUT, "logs", f"{cfg}_ours_{job['label']}_r{rep}.log"))
    r["output"] = os.path.join(out, "model.safetensors")
    return r


def run_fb(method: str, cfg: str, rep: int) -> dict:
    blocks, T = CONFIGS[cfg]
    data = make_synthetic.config_dir(blocks, 0)
    out = os.path.join(OUT, "merged", cfg, f"fusionbench_{method}.safetensors")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if os.path.exists(out):
        os.unlink(out)
    cmd = [FB_PY, os.path.join(HERE, "fusionbench_runner.py"), "--method", method, "--data", data, "--experts", str(T), "--out", out]
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    r = measure(cmd, os.path.join(OUT, "logs", f"{cfg}_fusionbench_{method}_r{rep}.log"), env)
    r["output"] = out
    return r


def ensure_fb_venv() -> bool:
    if os.path.exists(FB_PY):
        ok = subprocess.run([FB_PY, "-c", "import fusion_bench"], capture_output=True).returncode == 0
        if ok:
            return True
    print(f"setting up the FusionBench environment in {FB_VENV} (torch 2.13.0 CPU first, then fusion-bench) ...", flush=True)
    try:
        if not os.path.exists(FB_PY):
            subprocess.run(["python3", "-m", "venv", FB_VENV], check=True)
        subprocess.run([FB_PY, "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([FB_PY, "-m", "pip", "install", "-q", "fusion-bench"], check=True)
    except (subprocess.CalledProcessError, OSError) as e:
        print(f"FusionBench setup failed ({e}); continuing without it", flush=True)
        return False
    return True


# --------------------------------------------------------------------------------------- agreement
def compare(base_path: str, ours_path: str, ref_path: str) -> dict:
    """Per key: max|τ_ours − τ_ref| / max|τ_ref| with τ = θ − θ0 (float64)."""
    import torch
    from safetensors import safe_open
    worst = {"key": None, "rel_err": 0.0}
    per_key = {}
    with safe_open(base_path, "pt") as b, safe_open(ours_path, "pt") as o, safe_open(ref_path, "pt") as r:
        for k in b.keys():
            th0 = b.get_tensor(k).double()
            t_ref = r.get_tensor(k).double() - th0
            t_our = o.get_tensor(k).double() - th0
            scale = float(t_ref.abs().max())
            err = float((t_our - t_ref).abs().max()) / scale if scale > 0 else float((t_our - t_ref).abs().max())
            per_key[k] = err
            if err > worst["rel_err"]:
                worst = {"key": k, "rel_err": err}
    mats = [v for k, v in per_key.items() if v is not None]
    return {"max_rel_err": worst["rel_err"], "worst_key": worst["key"], "median_rel_err": statistics.median(mats),
            "keys": len(per_key), "per_key": per_key}


# --------------------------------------------------------------------------------------- summary
def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["rc"] == 0]
    use = ok or runs
    med = lambda xs: round(statistics.median(xs), 2)  # noqa: E731
    s = {"n": len(runs), "ok": len(ok), "wall_s": med([r["wall_s"] for r in use]), "wall_min_s": min(r["wall_s"] for r in use),
         "wall_max_s": max(r["wall_s"] for r in use), "peak_rss_mb": med([r["peak_rss_mb"] for r in use]),
         "bg_cores_max": max(r["bg_cores"] for r in use),
         "engine_revs": sorted({r.get("engine_rev", "?") for r in use})}
    child = [r["child"] for r in use if "child" in r]
    if child and "engine_timings_s" in child[0]:
        phases = {}
        for c in child:
            for k, v in c["engine_timings_s"].items():
                phases.setdefault(k, []).append(v)
        s["engine_phases_s"] = {k: med(v) for k, v in phases.items()}
        s["import_s"] = med([c["import_s"] for c in child])
    if child and "run_s" in child[0]:
        s["fb_run_s"] = med([c["run_s"] for c in child])
        s["import_s"] = med([c["import_s"] for c in child])
    if not ok:
        c = child[0] if child else {}
        s["error"] = (f"{c.get('error_type')}: {c.get('error')}" if c.get("error_type") else runs[0].get("error", "failed"))
    return s


def fmt_table(results: dict) -> str:
    lines = []
    for cfg, impls in results["summary"].items():
        blocks, T = CONFIGS[cfg]
        lines.append(f"\n== {cfg}: {blocks} blocks x {T} experts ==")
        lines.append(f"{'impl':<12}{'method':<20}{'wall s (med)':>13}{'min':>8}{'max':>8}{'peak RSS MB':>13}{'bg':>6}  note")
        for impl in ("ours", "fusionbench"):
            for label, s in impls.get(impl, {}).items():
                note = s.get("error", "")
                if impl == "ours" and "engine_phases_s" in s:
                    note = note or "phases " + " ".join(f"{k}={v}" for k, v in s["engine_phases_s"].items() if k != "total")
                if impl == "fusionbench" and "fb_run_s" in s:
                    note = note or f"import={s['import_s']} run={s['fb_run_s']}"
                lines.append(f"{impl:<12}{label:<20}{s['wall_s']:>13.2f}{s['wall_min_s']:>8.2f}{s['wall_max_s']:>8.2f}"
                             f"{s['peak_rss_mb']:>13.0f}{s['bg_cores_max']:>6.2f}  {note}")
    if results.get("ratios"):
        lines.append("\n== FusionBench / ours (same inputs, same run) ==")
        for cfg, rs in results["ratios"].items():
            for m, r in rs.items():
                lines.append(f"{cfg:<8}{m:<10} speed-up {r.get('speedup', float('nan')):>6.2f}x   RSS ours/FB {r.get('rss_ratio', float('nan')):.2f}"
                             + (f"   ({r['note']})" if r.get("note") else ""))
    if results.get("agreement"):
        lines.append("\n== agreement with FusionBench (max over keys of max|Δτ| / max|τ_FB|) ==")
        for cfg, rs in results["agreement"].items():
            for m, a in rs.items():
                if "max_rel_err" in a:
                    lines.append(f"{cfg:<8}{m:<10} max {a['max_rel_err']:.2e} (worst {a['worst_key']}), median {a['median_rel_err']:.2e}, "
                                 f"tolerance {a['tolerance']:.0e} -> {'PASS' if a['pass'] else 'FAIL'}")
                else:
                    lines.append(f"{cfg:<8}{m:<10} {a.get('note')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--repeat", type=int, default=3, help="runs per (config, method); the table shows medians")
    ap.add_argument("--fb-repeat", type=int, default=None, help="runs per FusionBench method on the main config (default: --repeat)")
    ap.add_argument("--scaling-repeat", type=int, default=1, help="runs per method on the scaling configs (b12_T4, b6_T8, b3_T8)")
    ap.add_argument("--long-run-s", type=float, default=150,
                    help="a job whose first run took longer than this is not repeated (keeps the whole benchmark near 30 min)")
    ap.add_argument("--fb-scaling-repeat", type=int, default=1, help="FusionBench runs on the b3_T8 config (0: none)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    ap.add_argument("--methods", default="", help="comma list of our method labels for the main config (default: all registered + task_arithmetic+sb)")
    ap.add_argument("--scaling-methods", default="tsv_m,iso_c,iso_cts", help="our methods run on the scaling configs")
    ap.add_argument("--options", default="{}", help="spec options for our runs (JSON), e.g. '{\"diagnostics\": \"off\"}'")
    ap.add_argument("--engine", choices=["head", "worktree"], default="head",
                    help="benchmark merging/ as committed at HEAD (a snapshot, default) or the live working tree")
    ap.add_argument("--no-fusionbench", action="store_true")
    ap.add_argument("--warm-inputs", action="store_true",
                    help="read each run's input files just before it starts (page cache warm for both implementations)")
    ap.add_argument("--quiet-threshold", type=float, default=0.3, help="cores other processes may use before a run starts")
    ap.add_argument("--max-wait", type=float, default=120, help="seconds to wait for an idle machine before each run")
    ap.add_argument("--profile", action="store_true", help="also run each of our methods once under cProfile (not timed)")
    ap.add_argument("--output", default=os.path.join(OUT, "results.json"))
    args = ap.parse_args(argv)

    global ENGINE_DIR
    engine_desc = "working tree"
    if args.engine == "head":
        ENGINE_DIR, commit = snapshot_engine()
        engine_desc = f"merging/ at HEAD {commit} ({os.path.relpath(ENGINE_DIR, REPO)})"
        sys.path.insert(0, ENGINE_DIR)  # the registry below must be the benchmarked one
    print(f"engine: {engine_desc}", flush=True)
    configs = [c for c in args.configs.split(",") if c]
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"unknown config {c!r}; known: {list(CONFIGS)}")
    main_jobs = our_jobs([m for m in args.methods.split(",") if m] or None)
    scaling_jobs = our_jobs([m for m in args.scaling_methods.split(",") if m] or None)
    fb = not args.no_fusionbench and ensure_fb_venv()
    fb_repeat = args.repeat if args.fb_repeat is None else args.fb_repeat

    # Data: generate what is missing (T=4 uses the first 4 experts of the 8-expert directory).
    for blocks in sorted({CONFIGS[c][0] for c in configs}):
        T = max(CONFIGS[c][1] for c in configs if CONFIGS[c][0] == blocks)
        calib = any(CONFIGS[c][0] == blocks and any(j["calibration"] for j in (main_jobs if c == MAIN else scaling_jobs))
                    for c in configs)
        print(f"data: {make_synthetic.config_name(blocks, 0)} ({T} experts{', calibration' if calib else ''})", flush=True)
        make_synthetic.ensure(blocks, T, 0, calibration=calib)

    # The schedule: (config, impl, label, job, repeats).
    schedule = []
    for cfg in configs:
        jobs = main_jobs if cfg == MAIN else scaling_jobs
        for j in jobs:
            schedule.append((cfg, "ours", j["label"], j, args.repeat if cfg == MAIN else args.scaling_repeat))
        if fb:
            n = fb_repeat if cfg == MAIN else (args.fb_scaling_repeat if cfg == "b3_T8" else 0)
            for m in FB_METHODS:
                if n > 0:
                    schedule.append((cfg, "fusionbench", m, None, n))
    total_runs = sum(s[4] for s in schedule)
    print(f"up to {total_runs} runs on {machine()['nproc']} cores ({machine()['cpu_model']})", flush=True)

    runs: dict = {}
    started = time.perf_counter()
    done = 0
    for rep in range(max(s[4] for s in schedule)):
        for cfg, impl, label, job, n in schedule:
            if rep >= n:
                continue
            first = runs.get(cfg, {}).get(impl, {}).get(label)
            if first and first[0]["wall_s"] > args.long_run_s:
                continue
            quiet = wait_quiet(args.quiet_threshold, args.max_wait)
            warm_s = warm_inputs(cfg, bool(job and job["calibration"])) if args.warm_inputs else None
            rev = ("head:" + os.path.basename(ENGINE_DIR)) if ENGINE_DIR else engine_rev()
            r = run_ours(job, cfg, rep, options=args.options) if impl == "ours" else run_fb(label, cfg, rep)
            r["engine_rev"] = rev
            r["load_before"] = round(quiet, 2)
            if warm_s is not None:
                r["warm_inputs_s"] = round(warm_s, 2)
            runs.setdefault(cfg, {}).setdefault(impl, {}).setdefault(label, []).append(r)
            done += 1
            status = "ok" if r["rc"] == 0 else f"FAILED ({(r.get('child') or {}).get('error_type') or r.get('error', '')[:80]})"
            print(f"[{done}/{total_runs} {time.perf_counter() - started:6.0f}s] {cfg} {impl:<11} {label:<20} "
                  f"{r['wall_s']:8.2f}s {r['peak_rss_mb']:8.0f} MB bg={r['bg_cores']:.2f} {status}", flush=True)

    results = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
               "git": git_state(), "engine": engine_desc, "options": json.loads(args.options), "warm_inputs": args.warm_inputs,
               "command": " ".join([os.path.relpath(sys.executable, REPO), "bench/run_bench.py", *(argv if argv is not None else sys.argv[1:])]),
               "configs": {c: {"blocks": CONFIGS[c][0], "experts": CONFIGS[c][1],
                               "data": os.path.relpath(make_synthetic.config_dir(CONFIGS[c][0], 0), REPO)} for c in configs},
               "total_bench_s": round(time.perf_counter() - started, 1), "runs": runs, "summary": {}, "ratios": {}, "agreement": {}}
    for cfg, impls in runs.items():
        results["summary"][cfg] = {impl: {label: summarize(rs) for label, rs in labels.items()} for impl, labels in impls.items()}

    # Ratios and output agreement wherever both ran.
    for cfg in configs:
        summ = results["summary"].get(cfg, {})
        for m in FB_METHODS:
            o, f = summ.get("ours", {}).get(m), summ.get("fusionbench", {}).get(m)
            if not o or not f:
                continue
            ratio = {"ours_wall_s": o["wall_s"], "fb_wall_s": f["wall_s"], "speedup": round(f["wall_s"] / o["wall_s"], 2),
                     "ours_rss_mb": o["peak_rss_mb"], "fb_rss_mb": f["peak_rss_mb"], "rss_ratio": round(o["peak_rss_mb"] / f["peak_rss_mb"], 3)}
            if f["ok"] == 0:
                ratio["note"] = f"FusionBench crashed after {f['wall_s']:.1f}s: {f.get('error')}"
            results["ratios"].setdefault(cfg, {})[m] = ratio
            ours_out = runs[cfg]["ours"][m][-1]["output"]
            fb_ok = [r for r in runs[cfg]["fusionbench"][m] if r["rc"] == 0]
            if fb_ok and o["ok"] and os.path.exists(fb_ok[-1]["output"]) and os.path.exists(ours_out):
                base = os.path.join(make_synthetic.config_dir(CONFIGS[cfg][0], 0), "base.safetensors")
                a = compare(base, ours_out, fb_ok[-1]["output"])
                a.update(tolerance=TOLERANCE[m], **{"pass": a["max_rel_err"] <= TOLERANCE[m]})
            else:
                a = {"note": "not compared: " + ("FusionBench produced no output" if not fb_ok else "our run failed")}
            results["agreement"].setdefault(cfg, {})[m] = a

    if args.profile:
        for cfg in configs:
            for j in (main_jobs if cfg == MAIN else []):
                print(f"profiling {cfg} {j['label']} ...", flush=True)
                run_ours(j, cfg, 99, profile=True, options=args.options)

    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)
    print(fmt_table(results))
    print(f"\nwrote {os.path.relpath(args.output, REPO)} ({results['total_bench_s']:.0f}s of runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

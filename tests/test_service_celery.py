"""Jobs through Celery on the real Redis, run by real worker subprocesses; a worker killed with
SIGKILL mid-job (as by the OOM killer): the job is retried, and fails with worker_lost once
SUBMERGE_MAX_ATTEMPTS attempts died."""
from __future__ import annotations

import os
import time

import torch
from safetensors.torch import load_file

from merging import merge

from tests.prom import sample
from tests.service_fixtures import *  # noqa: F401,F403
from tests.service_fixtures import MANY_SHAPES, REDIS_URL, job_spec, service_settings, sha256_bytes, write_family


def _settings(tmp_path, queue, **kw):
    return service_settings(tmp_path, redis_url=REDIS_URL, queue=queue, database_url=f"sqlite:///{tmp_path}/jobs.db",
                            max_attempts=2, lease_seconds=3.0, **kw)


def test_celery_end_to_end_job(api, celery_worker, redis_queue, checkpoints, tmp_path):
    settings = _settings(tmp_path, redis_queue)
    srv = api(settings)
    worker = celery_worker(settings, via_main=True, SUBMERGE_DEBUG_STEP_DELAY="0.05")
    base, experts = write_family(checkpoints)
    slow_base, slow_experts = write_family(checkpoints, shapes=MANY_SHAPES, prefix="slow-")
    with srv.client() as c:
        assert c.get("/readyz").json()["checks"]["broker"] == {"ok": True}
        job = srv.wait(c, c.post("/v1/merges", json=job_spec(base, experts)).json()["id"], timeout=90)
        assert job["status"] == "succeeded", (job, worker.output()[-3000:])
        started = next(e for e in c.get(f"/v1/merges/{job['id']}/events").json()["items"] if e["type"] == "started")
        assert f"/{worker.proc.pid}/" in started["data"]["worker"]  # ran in the worker process, not in the API
        assert started["data"]["worker"].split("/")[1] != str(os.getpid())
        with open(f"/proc/{started['data']['worker'].split('/')[1]}/stat") as f:  # SUBMERGE_WORKER_NICE (default 10)
            assert int(f.read().rsplit(")", 1)[1].split()[16]) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
        for a in c.get(f"/v1/merges/{job['id']}/artifacts").json()["items"]:
            assert sha256_bytes(c.get(a["url"]).content) == a["sha256"]
        assert c.get(f"/v1/merges/{job['id']}/report").status_code == 200
        assert sample(c.get("/metrics").text, "submerge_broker_queue_length") == 0
        # progress moves while the worker process runs it, and the artifact is what merging.merge makes
        body = job_spec(slow_base, slow_experts, method="ties", params={"alpha": 0.7, "k": 30})
        prog = c.post("/v1/merges", json=body).json()["id"]
        seen, job = set(), {"status": "queued"}
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            job = c.get(f"/v1/merges/{prog}").json()
            if job["status"] == "running" and job["progress"] is not None:
                seen.add((job["phase"], job["progress"]["fraction"]))
            time.sleep(0.03)
        assert job["status"] == "succeeded", (job, worker.output()[-3000:])
        assert len(seen) >= 2, f"progress did not move while running: {seen}"
        assert any(ph == "merge" for ph, _ in seen), seen
        direct = tmp_path / "direct"
        merge({**body, "output": {"uri": str(direct)}})
        ours = load_file(str(tmp_path / "data" / "artifacts" / prog / "model" / "model.safetensors"))
        ref = load_file(str(direct / "model.safetensors"))
        assert ours.keys() == ref.keys() and len(ref) == len(MANY_SHAPES)
        for k in ref:
            assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k
        # cancel reaches a job running in another process
        slow = c.post("/v1/merges", json=job_spec(slow_base, slow_experts)).json()["id"]
        srv.wait(c, slow, statuses=("running",), pred=lambda j: j["phase"] == "merge" and j["progress"]["done"] >= 2, timeout=60)
        assert c.post(f"/v1/merges/{slow}:cancel").status_code == 202
        assert srv.wait(c, slow, timeout=10)["status"] == "cancelled"
        assert not (tmp_path / "data" / "artifacts" / slow).exists()


def test_worker_killed_mid_job_is_retried_then_worker_lost(api, celery_worker, redis_queue, checkpoints, tmp_path):
    settings = _settings(tmp_path, redis_queue)
    srv = api(settings)
    base, experts = write_family(checkpoints, shapes=MANY_SHAPES)
    model_root = tmp_path / "data" / "artifacts"
    running_merge = lambda j: j["phase"] == "merge" and j["progress"]["done"] >= 3  # noqa: E731

    with srv.client() as c:
        # job A: the first worker dies mid-merge; the job is requeued and a second worker finishes it
        w1 = celery_worker(settings, SUBMERGE_DEBUG_STEP_DELAY="0.15")
        a = c.post("/v1/merges", json=job_spec(base, experts)).json()["id"]
        srv.wait(c, a, statuses=("running",), pred=running_merge, timeout=90)
        w1.kill()
        assert not list(model_root.glob(f"{a}/model/*")), "a half-written model is visible"
        job = srv.wait(c, a, statuses=("queued",), timeout=20)
        assert job["attempts"] == 1
        w2 = celery_worker(settings, SUBMERGE_DEBUG_STEP_DELAY="0.03")
        job = srv.wait(c, a, timeout=90)
        assert job["status"] == "succeeded" and job["attempts"] == 2, (job, w2.output()[-3000:])
        events = c.get(f"/v1/merges/{a}/events").json()["items"]
        types = [e["type"] for e in events]
        assert types.count("started") == 2 and types.count("retry") == 1 and types[-1] == "finished"
        retry = next(e for e in events if e["type"] == "retry")
        assert retry["data"]["reason"] == "worker_lost"
        assert not [p for p in (model_root / a).iterdir() if p.name not in ("model", "report.json", "report.html")]
        for art in job["result"]["artifacts"]:
            assert sha256_bytes((model_root / a / "model" / art["path"]).read_bytes()) == art["sha256"]

        # job B: kills its worker on every attempt -> failed with worker_lost after max_attempts (2)
        w2.stop()
        w3 = celery_worker(settings, SUBMERGE_DEBUG_STEP_DELAY="0.15")
        b = c.post("/v1/merges", json=job_spec(base, experts)).json()["id"]
        srv.wait(c, b, statuses=("running",), pred=running_merge, timeout=90)
        w3.kill()
        srv.wait(c, b, statuses=("queued",), timeout=20)
        w4 = celery_worker(settings, SUBMERGE_DEBUG_STEP_DELAY="0.15")
        srv.wait(c, b, statuses=("running",), pred=lambda j: running_merge(j) and j["attempts"] == 2, timeout=90)
        w4.kill()
        job = srv.wait(c, b, timeout=20)
        assert job["status"] == "failed" and job["error"]["code"] == "worker_lost", job
        assert job["attempts"] == 2 and "after 2 attempt(s)" in job["error"]["message"]
        assert not list(model_root.glob(f"{b}/model/*"))
        assert sample(c.get("/metrics").text, "submerge_jobs", status="failed") == 1

"""Restarts of `submerge serve` in embedded mode (a real subprocess on a real data directory):
graceful stops (SIGTERM) do not use up a job's attempts, and after a crash (SIGKILL) the restarted
server requeues the job it held at once instead of waiting out the lease. Also the data-directory
lock that tells a restarted server that no other live server holds those jobs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from workers.jobs.store import JobStore
from tests.service_fixtures import (MANY_SHAPES, free_loopback_port, job_spec, service_settings, settings_env, wait_serving,
                                    write_family)
from workers.ownership import EmbeddedOwnership

REPO = Path(__file__).resolve().parents[1]
FINISHED = ("succeeded", "failed", "cancelled")


class Serve:
    """`submerge serve` on a free loopback port, in embedded mode on tmp_path/data."""

    def __init__(self, tmp_path: Path, **settings):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SUBMERGE_")}
        env.update(settings_env(service_settings(tmp_path, **settings)))
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.env, self.cwd, self.log = env, tmp_path, tmp_path / "serve.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Serve":
        port = free_loopback_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port",
                                          str(port), "--log-level", "warning"], cwd=self.cwd, env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT)
        wait_serving(self.proc, self.url, timeout=90, failure=self.output, poll=0.1)
        return self

    def get(self, path: str) -> dict:
        r = httpx.get(self.url + path, timeout=30)  # no kept-alive connection to hold up a shutdown
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, job_id: str, pred, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while True:
            job = self.get(f"/v1/merges/{job_id}")
            if pred(job):
                return job
            assert time.monotonic() < end, f"after {timeout}s: {job}\n{self.output()[-3000:]}"
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _merging(min_done: int = 2):
    return lambda j: j["status"] == "running" and j["phase"] == "merge" and j["progress"]["done"] >= min_done


def _types(serve: Serve, job_id: str) -> list[str]:
    return [e["type"] for e in serve.get(f"/v1/merges/{job_id}/events")["items"]]


def test_sigterm_three_times_during_one_job_does_not_use_up_its_attempts(checkpoints, tmp_path):
    base, experts = write_family(checkpoints, shapes=MANY_SHAPES)
    serve = Serve(tmp_path, max_attempts=3, debug_step_delay=0.15)
    try:
        serve.start()
        r = httpx.post(f"{serve.url}/v1/merges", json=job_spec(base, experts), timeout=30)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        store = JobStore(f"sqlite:///{tmp_path}/data/submerge.db")
        for stop in range(3):
            if stop:
                serve.start()
            serve.wait(job_id, _merging(), timeout=60)
            serve.signal(signal.SIGTERM)  # graceful (uvicorn re-raises the signal once it has shut down)
            job = store.get(job_id)  # back in the queue, with its attempt given back
            assert (job.status, job.attempts) == ("queued", 0), (job.status, job.attempts, serve.output()[-3000:])
        serve.start()
        job = serve.wait(job_id, lambda j: j["status"] in FINISHED, timeout=90)
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        types = _types(serve, job_id)
        assert types.count("started") == 4 and types.count("retry") == 3, types
    finally:
        serve.stop()


def test_sigkill_restart_requeues_the_job_at_once(checkpoints, tmp_path):
    base, experts = write_family(checkpoints, shapes=MANY_SHAPES)
    serve = Serve(tmp_path, lease_seconds=60.0, debug_step_delay=0.15)
    try:
        serve.start()
        job_id = httpx.post(f"{serve.url}/v1/merges", json=job_spec(base, experts), timeout=30).json()["id"]
        serve.wait(job_id, _merging(), timeout=60)
        serve.signal(signal.SIGKILL)
        killed = time.monotonic()
        serve.start()
        # its lease runs for up to 60 s more (renewed every 10 s): without the reclaim it stays "running"
        job = serve.wait(job_id, lambda j: j["status"] in FINISHED, timeout=35 - (time.monotonic() - killed))
        assert job["status"] == "succeeded" and job["attempts"] == 2, job
        events = serve.get(f"/v1/merges/{job_id}/events")["items"]
        assert [e["type"] for e in events].count("started") == 2
        retry = next(e for e in events if e["type"] == "retry")
        assert retry["data"]["reason"] == "worker_lost" and "died with its server" in retry["data"]["message"]
    finally:
        serve.stop()


def test_data_dir_lock_tells_whether_another_server_is_alive(tmp_path):
    first = EmbeddedOwnership(str(tmp_path / "data"))
    assert first.acquire() is True
    first.share()
    second = EmbeddedOwnership(str(tmp_path / "data"))
    assert second.acquire() is False  # the first still runs: its jobs are not to be reclaimed
    assert second.owner == first.owner and second.owner.startswith("embedded-")
    first.release()
    second.release()
    # a server killed while holding the lock: the kernel drops it, whatever pid comes next
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from workers.ownership import EmbeddedOwnership; "
                               "o = EmbeddedOwnership(sys.argv[1]); o.acquire(); o.share(); print('held', flush=True); "
                               "time.sleep(600)", str(tmp_path / "data")], cwd=REPO, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        while_held = EmbeddedOwnership(str(tmp_path / "data"))
        assert while_held.acquire() is False
        while_held.release()
        holder.kill()
        holder.wait(timeout=10)
        third = EmbeddedOwnership(str(tmp_path / "data"))
        assert third.acquire() is True and third.owner == first.owner
        third.release()
    finally:
        holder.kill()
        holder.wait(timeout=10)
    other = EmbeddedOwnership(str(tmp_path / "other"))
    assert other.acquire() is True and other.owner != first.owner  # another data directory: another owner
    other.release()

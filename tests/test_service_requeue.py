"""The job store is the source of truth and the Celery queue follows it (real Redis, real worker
subprocesses): jobs whose messages Redis lost, jobs that could not be sent while Redis was down
(at submit and at a retry by the reaper), and the replay of a submit that got 503 all run, and
each runs once however many messages of it there are."""
from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlsplit

import pytest
import redis

from workers import dispatch
from workers.dispatch import CeleryDispatcher
from tests.service_fixtures import *  # noqa: F401,F403
from tests.service_fixtures import MANY_SHAPES, REDIS_URL, job_spec, service_settings, write_family


def _settings(tmp_path, queue, **kw):
    base = dict(redis_url=REDIS_URL, queue=queue, database_url=f"sqlite:///{tmp_path}/jobs.db", max_attempts=2,
                lease_seconds=3.0, requeue_after=1.5)
    return service_settings(tmp_path, **{**base, **kw})


class Gate:
    """A TCP forwarder to the test Redis that can be shut (refusing connections and cutting the
    open ones, as a Redis that went down) and opened again on the same port."""

    def __init__(self):
        target = urlsplit(REDIS_URL)
        self.target, self.db = (target.hostname, target.port or 6379), target.path.lstrip("/") or "0"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/{self.db}"
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def shut(self) -> None:
        if self._listener is not None:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() below
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            self._close(c)

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @classmethod
    def _pump(cls, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            cls._close(a)
            cls._close(b)

    @staticmethod
    def _close(s: socket.socket) -> None:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


@pytest.fixture
def gate():
    g = Gate()
    yield g
    g.shut()


@pytest.fixture
def rq():
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.close()


def _until(cond, timeout: float, what: str):
    end = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < end, f"not after {timeout}s: {what}"
        time.sleep(0.05)
    return value


def _started(c, job_id: str) -> int:
    return [e["type"] for e in c.get(f"/v1/merges/{job_id}/events").json()["items"]].count("started")


def test_jobs_whose_messages_redis_lost_run_exactly_once(api, celery_worker, redis_queue, rq, checkpoints, tmp_path):
    settings = _settings(tmp_path, redis_queue)
    srv = api(settings)
    base, experts = write_family(checkpoints)
    with srv.client() as c:
        ids = [c.post("/v1/merges", json=job_spec(base, experts)).json()["id"] for _ in range(3)]
        assert rq.llen(redis_queue) == 3
        # Redis restarts without its data: the messages and kombu's bindings of the queue are gone
        rq.delete(*rq.keys(f"*{redis_queue}*"))
        _until(lambda: rq.llen(redis_queue) == 3, 15, "the sweep sends the queued jobs again")
        time.sleep(3 * settings.requeue_after)  # their messages wait: not sent again
        assert rq.llen(redis_queue) == 3
        dispatcher = CeleryDispatcher(settings)  # plus a duplicate of each: still one run per job
        for job_id in ids:
            dispatcher.submit(job_id)
        dispatcher.stop()
        worker = celery_worker(settings)
        for job_id in ids:
            job = srv.wait(c, job_id, timeout=120)
            assert job["status"] == "succeeded" and job["attempts"] == 1, (job, worker.output()[-3000:])
        _until(lambda: rq.llen(redis_queue) == 0, 60, "the worker drains the duplicates")
        _until(lambda: worker.output().count("not claimable") == 3, 30, "the duplicates are skipped")
        assert [_started(c, job_id) for job_id in ids] == [1, 1, 1]


def test_jobs_not_sent_while_redis_was_down_run_when_it_is_back(api, celery_worker, redis_queue, rq, gate, checkpoints,
                                                                 tmp_path):
    worker_settings = _settings(tmp_path, redis_queue)
    srv = api(worker_settings.model_copy(update={"redis_url": gate.url}))  # the API reaches Redis through the gate
    base, experts = write_family(checkpoints)
    slow_base, slow_experts = write_family(checkpoints, shapes=MANY_SHAPES, prefix="slow-")
    with srv.client() as c:
        # 1. submit while Redis is down: 503, the job stays queued, and is sent once Redis is back
        r = c.post("/v1/merges", json=job_spec(base, experts))
        assert r.status_code == 503 and r.json()["error"]["code"] == "broker_unavailable", r.text
        assert "reaper sends it" in r.json()["error"]["message"]
        [a] = c.get("/v1/merges").json()["items"]
        time.sleep(4 * worker_settings.reaper_interval)  # sweeps that fail: the job is kept, not lost
        assert c.get(f"/v1/merges/{a['id']}").json()["status"] == "queued"
        gate.open()
        _until(lambda: rq.llen(redis_queue) == 1, 15, "the API's sweep sends the job")
        w1 = celery_worker(worker_settings, SUBMERGE_DEBUG_STEP_DELAY="0.15")
        job = srv.wait(c, a["id"], timeout=120)
        assert job["status"] == "succeeded", (job, w1.output()[-3000:])

        # 2. the worker dies while Redis is down: the reaper cannot send the retry, the sweep does later
        b = c.post("/v1/merges", json=job_spec(slow_base, slow_experts)).json()["id"]
        srv.wait(c, b, statuses=("running",), pred=lambda j: j["phase"] == "merge" and j["progress"]["done"] >= 2,
                 timeout=90)
        gate.shut()
        w1.kill()
        job = srv.wait(c, b, statuses=("queued",), timeout=20)
        assert job["attempts"] == 1
        time.sleep(4 * worker_settings.reaper_interval)
        assert rq.llen(redis_queue) == 0 and c.get(f"/v1/merges/{b}").json()["status"] == "queued"
        gate.open()
        _until(lambda: rq.llen(redis_queue) == 1, 15, "the API's sweep sends the retry")
        w2 = celery_worker(worker_settings, SUBMERGE_DEBUG_STEP_DELAY="0.01")
        job = srv.wait(c, b, timeout=120)
        assert job["status"] == "succeeded" and job["attempts"] == 2, (job, w2.output()[-3000:])
        assert (_started(c, a["id"]), _started(c, b)) == (1, 2)


def test_replaying_a_503_idempotency_key_sends_the_job(api, celery_worker, redis_queue, rq, gate, checkpoints, tmp_path):
    # No reaper pass during the test (API and worker): only the replay can send the job.
    worker_settings = _settings(tmp_path, redis_queue, reaper_interval=3600.0)
    srv = api(worker_settings.model_copy(update={"redis_url": gate.url}))
    base, experts = write_family(checkpoints)
    key = {"Idempotency-Key": "retry-me"}
    with srv.client() as c:
        r = c.post("/v1/merges", json=job_spec(base, experts), headers=key)
        assert r.status_code == 503, r.text
        r = c.post("/v1/merges", json=job_spec(base, experts), headers=key)  # Redis still down: 503 again
        assert r.status_code == 503 and r.json()["error"]["code"] == "broker_unavailable", r.text
        [job] = c.get("/v1/merges").json()["items"]
        gate.open()
        r = c.post("/v1/merges", json=job_spec(base, experts), headers=key)
        assert r.status_code == 202 and r.headers["Idempotent-Replayed"] == "true" and r.json()["id"] == job["id"]
        assert rq.llen(redis_queue) == 1
        r = c.post("/v1/merges", json=job_spec(base, experts), headers=key)  # sent already: not again
        assert r.status_code == 202 and r.headers["Idempotent-Replayed"] == "true"
        assert rq.llen(redis_queue) == 1
        worker = celery_worker(worker_settings)
        job = srv.wait(c, job["id"], timeout=120)
        assert job["status"] == "succeeded" and job["attempts"] == 1, (job, worker.output()[-3000:])
        assert _started(c, job["id"]) == 1


def test_celery_dispatcher_reports_the_jobs_waiting_in_the_queue(redis_queue, rq, tmp_path, monkeypatch):
    dispatcher = CeleryDispatcher(_settings(tmp_path, redis_queue))
    try:
        for job_id in ("job-a", "job-b", "job-a", "job-c"):
            dispatcher.submit(job_id)
        rq.lpush(redis_queue, b"not a kombu message")
        waiting = dispatcher.waiting()
        assert waiting.ids == {"job-a", "job-b", "job-c"} and waiting.complete
        monkeypatch.setattr(dispatch, "SCAN_LIMIT", 2)  # a long queue: the oldest messages are read
        waiting = dispatcher.waiting()
        assert waiting.ids == {"job-a", "job-b"} and not waiting.complete
    finally:
        dispatcher.stop()

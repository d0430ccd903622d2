"""Fixtures for the service tests: the API under real uvicorn on 127.0.0.1, Celery worker
subprocesses on the real Redis, PostgreSQL databases made per test, a webhook receiver.

Import what you need in a test module: ``from tests.service_fixtures import *  # noqa``.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import torch

from workers.config import Settings

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
REDIS_URL = os.environ.get("SUBMERGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/7")
PG_URL = os.environ.get("SUBMERGE_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
TOKENS = {"tenantA": "token-a-secret", "tenantB": "token-b-secret"}
API_KEYS = [f"{t}:{hashlib.sha256(tok.encode()).hexdigest()}" for t, tok in TOKENS.items()]

# Many tiny tensors: with SUBMERGE_DEBUG_STEP_DELAY a job runs as long as a test needs.
MANY_SHAPES = {f"model.layers.{i}.mlp.up_proj.weight": (8, 8) for i in range(40)}


def service_settings(tmp_path: Path, **overrides) -> Settings:
    """Embedded-mode settings confined to tmp_path (no environment variables read)."""
    data = tmp_path / "data"
    base = dict(data_dir=str(data), auth="off", redis_url=None, database_url=None, storage_uri=None, api_keys=[],
                s3_endpoint_url=None, webhook_secret=None, allowed_hosts=[], allowed_buckets=[], allowed_private_networks=[], file_roots=[str(tmp_path)], cache_dir=str(tmp_path / "cache"),
                lease_seconds=3.0, reaper_interval=0.5, progress_interval=0.2, cancel_poll_interval=0.05,
                webhook_backoff=0.1, webhook_timeout=5.0)
    base.update(overrides)
    return Settings(_env_file=None, **{k: v for k, v in base.items()})


def settings_env(s: Settings) -> dict[str, str]:
    """The same settings as SUBMERGE_* variables (for worker subprocesses)."""
    env = {}
    for name, value in s.model_dump().items():
        if value is None:
            continue
        if isinstance(value, list):
            value = ",".join(value)
        env[f"SUBMERGE_{name.upper()}"] = str(value)
    return env


# --------------------------------------------------------------------------------------------
# The API under uvicorn
# --------------------------------------------------------------------------------------------

@dataclass
class ApiServer:
    url: str
    settings: Settings
    app: object
    server: object
    thread: threading.Thread

    def client(self, token: str | None = None, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kw)

    def wait(self, client: httpx.Client, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout: float = 60,
             pred=None) -> dict:
        end = time.monotonic() + timeout
        while True:
            r = client.get(f"/v1/merges/{job_id}")
            assert r.status_code == 200, r.text
            job = r.json()
            if job["status"] in statuses and (pred is None or pred(job)):
                return job
            if time.monotonic() > end:
                raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s: {job}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_api_server(settings: Settings) -> ApiServer:
    import uvicorn

    from service.app import create_app

    app = create_app(settings)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > end:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return ApiServer(f"http://{LOOPBACK}:{port}", settings, app, server, thread)


def free_loopback_port() -> int:
    """A port nothing listens on now (for a `submerge serve` subprocess to bind)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_serving(proc: subprocess.Popen, url: str, timeout: float = 60.0, failure=lambda: "submerge serve did not start",
                 poll: float = 0.2) -> None:
    """Poll ``url``/healthz until it answers 200; fail with ``failure()`` when ``proc`` exits or time runs out."""
    end = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < end, failure()
        time.sleep(poll)


@pytest.fixture
def api():
    """``api(settings) -> ApiServer``: the app under uvicorn on a free loopback port, stopped at teardown."""
    started: list[ApiServer] = []

    def start(settings: Settings) -> ApiServer:
        s = start_api_server(settings)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


# --------------------------------------------------------------------------------------------
# Redis + Celery worker subprocesses
# --------------------------------------------------------------------------------------------

def _redis_client():
    import redis
    return redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)


@pytest.fixture
def redis_queue():
    """A fresh queue name on the test Redis (skip if Redis is down); its keys are removed afterwards."""
    try:
        client = _redis_client()
        client.ping()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {e}")
    queue = f"submerge-test-{uuid.uuid4().hex[:10]}"
    yield queue
    client.delete(queue)
    for tag, payload in client.hscan_iter("unacked"):  # messages of killed workers
        if queue.encode() in payload:
            client.hdel("unacked", tag)
            client.zrem("unacked_index", tag)
    client.close()


class CeleryWorker:
    def __init__(self, env: dict[str, str], log_path: Path, via_main: bool = False):
        self.env, self.log_path, self.via_main = env, log_path, via_main
        self.proc: subprocess.Popen | None = None

    def start(self) -> "CeleryWorker":
        self.log = open(self.log_path, "ab")
        opts = ["--pool=solo", "--without-heartbeat", "-n", f"test-{uuid.uuid4().hex[:6]}@%h"]
        if self.via_main:  # what `submerge worker ...` runs
            cmd = [sys.executable, "-c", "import sys, workers; sys.exit(workers.main(sys.argv[1:]))", *opts]
        else:
            cmd = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "--without-gossip",
                   "--without-mingle", "-l", "INFO", "-Q", self.env["SUBMERGE_QUEUE"], *opts]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup, no ack, exactly like the OOM killer."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "log", None):
            self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def celery_worker(tmp_path):
    """``celery_worker(settings, **env_overrides) -> CeleryWorker`` (started; stopped at teardown)."""
    workers: list[CeleryWorker] = []

    def start(settings: Settings, via_main: bool = False, **extra) -> CeleryWorker:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SUBMERGE_")}
        env.update(settings_env(settings))
        env.update({k: str(v) for k, v in extra.items()})
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        w = CeleryWorker(env, tmp_path / f"worker-{len(workers)}.log", via_main).start()
        workers.append(w)
        return w

    yield start
    for w in workers:
        w.stop()


# --------------------------------------------------------------------------------------------
# PostgreSQL: one fresh database per test
# --------------------------------------------------------------------------------------------

@pytest.fixture
def pg_database_url():
    try:
        import psycopg
    except ImportError:
        pytest.skip("psycopg (PostgreSQL driver) is not installed")
    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=3)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {e}")
    name = f"submerge_test_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    url = PG_URL.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        from workers.jobs.db import dispose_all
        dispose_all()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


# --------------------------------------------------------------------------------------------
# Webhook receiver
# --------------------------------------------------------------------------------------------

@dataclass
class Receiver:
    url: str
    requests: list[dict] = field(default_factory=list)
    fail_first: int = 0
    event: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def webhook_receiver():
    """``webhook_receiver(fail_first=0) -> Receiver``: records POSTs; answers 500 to the first n."""
    servers = []

    def start(fail_first: int = 0) -> Receiver:
        state = Receiver(url="", fail_first=fail_first)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                state.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                status = 500 if len(state.requests) <= state.fail_first else 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                if status == 204:
                    state.event.set()

        httpd = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        httpd.daemon_threads = True
        state.url = f"http://{LOOPBACK}:{httpd.server_address[1]}/hook"
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(httpd)
        return state

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------

def job_spec(base: str, experts: list[str], method: str = "task_arithmetic", params: dict | None = None, **extra) -> dict:
    """A REST body: a MergeSpec without output (the service publishes to its own storage)."""
    return {"method": method, "params": {"alpha": 0.5} if params is None else params, "base": {"uri": base},
            "experts": [{"uri": e} for e in experts], "options": {"device": "cpu"}, **extra}


def write_family(checkpoints, n_experts: int = 2, shapes=None, prefix: str = "") -> tuple[str, list[str]]:
    base, experts = checkpoints.family(n_experts=n_experts, shapes=shapes)
    b = checkpoints.directory(base, f"{prefix}base", side_files={"config.json": json.dumps({"model_type": "tiny"})})
    es = [checkpoints.file(e, f"{prefix}e{i}.safetensors") for i, e in enumerate(experts)]
    return b, es


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


__all__ = ["api", "free_loopback_port", "wait_serving", "celery_worker", "pg_database_url", "redis_queue", "webhook_receiver", "service_settings", "settings_env",
           "job_spec", "write_family", "sha256_bytes", "TOKENS", "API_KEYS", "MANY_SHAPES", "REDIS_URL"]

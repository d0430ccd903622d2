"""`submerge serve` with no settings at all (embedded mode: SQLite, local storage, in-process pool,
auth off on loopback, file inputs from the working directory), `submerge worker` without Redis,
and the docs/deployment files agreeing with the settings."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from workers.config import Settings
from tests.service_fixtures import free_loopback_port, job_spec, sha256_bytes, wait_serving, write_family

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUBMERGE_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_submerge_serve_embedded_defaults(checkpoints, tmp_path):
    port = free_loopback_port()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warning"], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_serving(proc, url, failure=lambda: proc.stdout.read().decode() if proc.poll() is not None else "timeout")
        base, experts = write_family(checkpoints)  # under tmp_path = the working directory
        with httpx.Client(base_url=url, timeout=30) as c:
            job = c.post("/v1/merges", json=job_spec(base, experts)).json()
            while job["status"] not in ("succeeded", "failed"):
                time.sleep(0.1)
                job = c.get(f"/v1/merges/{job['id']}").json()
            assert job["status"] == "succeeded", job
            assert job["result"]["model_uri"] == f"file://{tmp_path}/data/artifacts/{job['id']}/model"
            art = next(a for a in job["result"]["artifacts"] if a["path"] == "model.safetensors")
            assert sha256_bytes(c.get(f"/v1/merges/{job['id']}/artifacts/model.safetensors").content) == art["sha256"]
            assert (tmp_path / "data" / "submerge.db").is_file()
            r = c.post("/v1/merges", json=job_spec("/etc/hostname", experts))
            assert r.status_code == 422 and r.json()["error"]["field"] == "base.uri"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_submerge_worker_without_redis_explains(tmp_path):
    r = subprocess.run([sys.executable, "-m", "service.cli", "worker"], cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "SUBMERGE_REDIS_URL" in r.stderr


def test_every_setting_is_documented_and_deployment_files_use_real_settings():
    doc = (REPO / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`SUBMERGE_{name.upper()}`" in doc, f"SUBMERGE_{name.upper()} is not documented in README.md"
    known = {f"SUBMERGE_{n.upper()}" for n in Settings.model_fields} | {"SUBMERGE_HOST", "SUBMERGE_PORT"}
    compose = (REPO / "docker-compose.yml").read_text()
    used = set(re.findall(r"\b(SUBMERGE_[A-Z0-9_]+)\s*:", compose))
    assert used and used <= known, used - known
    import yaml
    services = yaml.safe_load(compose)["services"]
    assert {"api", "worker", "redis", "minio", "postgres"} <= set(services)
    assert services["worker"]["command"][:2] == ["submerge", "worker"]
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in dockerfile and '"submerge", "serve"' in dockerfile
    assert dockerfile.index('"torch>=') < dockerfile.index("pip install .")

"""Dockerfile and docker-compose.yml: structure checks (no Docker engine is needed), and
`docker compose config -q` when the compose plugin is installed (skipped, with the reason, when not)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_dockerfile_is_multi_stage_non_root_with_base_image_arg():
    text = (REPO / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert lines[0] == "ARG BASE_IMAGE=python:3.11-slim"  # before the first FROM: usable in every FROM
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert froms == ["FROM ${BASE_IMAGE} AS builder", "FROM ${BASE_IMAGE} AS runtime"]
    builder, runtime = text.split("AS runtime", 1)
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in builder
    assert 'pip install --index-url "$TORCH_INDEX" "torch>=' in builder
    assert builder.index("python3 -m venv /opt/venv") < builder.index('"torch>=') < builder.index("pip install .")
    assert "COPY --from=builder /opt/venv /opt/venv" in runtime and "pip install" not in runtime
    users = re.findall(r"^USER (\S+)$", runtime, re.M)
    assert users and users[-1] not in ("root", "0"), users
    assert "useradd" in runtime and '"submerge", "serve"' in runtime


def test_compose_services_dependencies_and_bucket_creation():
    doc = _compose()
    services = doc["services"]
    assert {"api", "worker", "redis", "postgres", "minio", "minio-init"} <= set(services)
    init = services["minio-init"]
    assert init["image"].startswith("minio/mc")
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb" in " ".join(init["entrypoint"]) and "local/submerge" in " ".join(init["entrypoint"])
    bucket = services["api"]["environment"]["SUBMERGE_STORAGE_URI"].removeprefix("s3://").split("/")[0]
    assert f"local/{bucket}" in " ".join(init["entrypoint"])
    for name in ("api", "worker"):
        svc = services[name]
        deps = svc["depends_on"]
        assert deps["minio-init"]["condition"] == "service_completed_successfully"
        assert deps["postgres"]["condition"] == deps["redis"]["condition"] == "service_healthy"
        env = svc["environment"]
        assert env["SUBMERGE_REDIS_URL"].startswith("redis://redis:")
        assert env["SUBMERGE_DATABASE_URL"].startswith("postgresql://") and "@postgres:" in env["SUBMERGE_DATABASE_URL"]
        assert env["SUBMERGE_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert svc["build"]["args"]["BASE_IMAGE"].startswith("${BASE_IMAGE:-python:3.11-slim")
        assert "TORCH_INDEX" in svc["build"]["args"]
    assert services["worker"]["command"][:2] == ["submerge", "worker"]
    assert services["api"]["command"][:2] == ["submerge", "serve"]
    for name in ("redis", "postgres", "minio"):
        assert "healthcheck" in services[name], name


def _compose_command() -> tuple[list[str] | None, str]:
    """``docker compose`` (the v2 plugin), else ``docker-compose`` (v1, which validates the same
    file format), installing Debian's docker-compose package when neither is there."""
    docker = shutil.which("docker")
    if docker:
        r = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
        if r.returncode == 0:
            return [docker, "compose"], "docker compose"
    if not shutil.which("docker-compose") and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "docker-compose"], capture_output=True,
                       timeout=600, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    v1 = shutil.which("docker-compose")
    if v1:
        return [v1], "docker-compose (v1)"
    return None, "neither the docker compose plugin nor docker-compose is installed, and installing Debian's docker-compose failed"


def test_docker_compose_config_is_valid(tmp_path):
    cmd, what = _compose_command()
    if cmd is None:
        pytest.skip(f"NOT CHECKED with docker compose: {what}; the structure test above still ran")
    env = {**os.environ, "SUBMERGE_API_KEYS": "tenantA:" + "0" * 64}
    r = subprocess.run([*cmd, "-f", str(REPO / "docker-compose.yml"), "config", "-q"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{what}: {r.stderr}"
    # the validator really validates: a misspelt option is refused
    bad = tmp_path / "docker-compose.yml"
    bad.write_text((REPO / "docker-compose.yml").read_text().replace("services:\n", "services:\n  broken:\n    image: x\n    restart_policy: 1\n", 1))
    r = subprocess.run([*cmd, "-f", str(bad), "config", "-q"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "restart_policy" in (r.stderr + r.stdout), (what, r.stderr)

"""Shared fixtures: real servers on loopback (moto's S3, a Range-capable HTTP file server) and
small checkpoints on disk. Nothing here mocks what can be run."""
from __future__ import annotations

import email.utils
import json
import os
import posixpath
import re
import threading
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

LOOPBACK = "127.0.0.1"


# --------------------------------------------------------------------------------------------
# S3: moto's server on 127.0.0.1, one per test session
# --------------------------------------------------------------------------------------------

@dataclass
class S3Server:
    endpoint: str
    key: str = "testing"
    secret: str = "testing"
    region: str = "us-east-1"

    @property
    def storage_options(self) -> dict:
        """fsspec/s3fs options for ``IOConfig(storage_options={"s3": ...})``."""
        return {"endpoint_url": self.endpoint, "key": self.key, "secret": self.secret,
                "client_kwargs": {"region_name": self.region}}

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name=self.region)

    def new_bucket(self, prefix: str = "bkt") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def upload_dir(self, local: str | Path, bucket: str, prefix: str) -> str:
        """Upload every file under ``local`` to ``s3://bucket/prefix/...``; return that URI."""
        client = self.client()
        local = Path(local)
        for p in sorted(local.rglob("*")):
            if p.is_file():
                client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(local).as_posix()}")
        return f"s3://{bucket}/{prefix}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out, token = [], None
        client = self.client()
        while True:
            kw = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            r = client.list_objects_v2(**kw)
            out += [o["Key"] for o in r.get("Contents", [])]
            if not r.get("IsTruncated"):
                return sorted(out)
            token = r["NextContinuationToken"]

    def get(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port; credentials are dummies, never real ones."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED")}
    # Keep botocore away from instance metadata and from any credentials of the machine.
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_EC2_METADATA_DISABLED="true")
    server = ThreadedMotoServer(ip_address=LOOPBACK, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(endpoint=f"http://{host}:{port}")
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --------------------------------------------------------------------------------------------
# HTTP: a small threaded static file server with Range and HEAD, that records every request
# --------------------------------------------------------------------------------------------

@dataclass
class Request:
    method: str
    path: str
    range: str | None
    status: int


@dataclass
class HTTPServer:
    root: Path
    url: str
    requests: list[Request] = field(default_factory=list)
    honour_range: bool = True

    def url_for(self, rel: str) -> str:
        return f"{self.url}/{rel.lstrip('/')}"

    def gets(self, path_suffix: str = "", *, full_only: bool = False, failed: bool = False) -> list[Request]:
        """Answered GET requests whose path ends with ``path_suffix`` (``full_only``: those
        without Range; ``failed``: also those answered 4xx, which transfer no data)."""
        return [r for r in self.requests if r.method == "GET" and r.path.endswith(path_suffix)
                and not (full_only and r.range) and (failed or r.status < 400)]

    def clear(self) -> None:
        self.requests.clear()


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _make_handler(state: HTTPServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: no keep-alive threads to reap

        def log_message(self, *args):  # quiet
            pass

        def _file(self) -> Path | None:
            rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
            if rel.endswith("/"):
                return None  # directories are not listable, like most model hosts
            rel = posixpath.normpath("/" + rel).lstrip("/")
            p = (state.root / rel).resolve()
            if state.root.resolve() not in p.parents or not p.is_file():
                return None
            return p

        def _headers(self, p: Path, status: int, length: int, extra: dict | None = None):
            st = p.stat()
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes" if state.honour_range else "none")
            self.send_header("ETag", f'"{st.st_mtime_ns:x}-{st.st_size:x}"')
            self.send_header("Last-Modified", email.utils.formatdate(st.st_mtime, usegmt=True))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()

        def _record(self, status: int):
            state.requests.append(Request(self.command, urllib.parse.urlsplit(self.path).path, self.headers.get("Range"), status))

        def _not_found(self):
            self._record(404)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_HEAD(self):
            p = self._file()
            if p is None:
                return self._not_found()
            self._record(200)
            self._headers(p, 200, p.stat().st_size)

        def _unsatisfiable(self, size):
            self._record(416)
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):
            p = self._file()
            if p is None:
                return self._not_found()
            size = p.stat().st_size
            rng = self.headers.get("Range") if state.honour_range else None
            start, end = 0, size - 1
            status = 200
            if rng:
                m = _RANGE.match(rng.strip())
                if not m or (not m.group(1) and not m.group(2)):
                    return self._unsatisfiable(size)
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                else:  # suffix range: the last n bytes
                    start, end = max(0, size - int(m.group(2))), size - 1
                if start >= size or end < start:
                    return self._unsatisfiable(size)
                status = 206
            self._record(status)
            length = end - start + 1 if size else 0
            extra = {"Content-Range": f"bytes {start}-{end}/{size}"} if status == 206 else None
            self._headers(p, status, length, extra)
            try:
                with open(p, "rb") as f:
                    f.seek(start)
                    left = length
                    while left > 0:
                        chunk = f.read(min(left, 1 << 20))
                        if not chunk:
                            break
                        self.wfile.write(chunk)
                        left -= len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass

    return Handler


@pytest.fixture
def serve_http():
    """``serve_http(directory, honour_range=True) -> HTTPServer``: serve files on 127.0.0.1.

    Supports HEAD (with Content-Length, ETag, Last-Modified) and single byte ranges; records
    every request in ``.requests``. Directory URLs answer 404 (not listable).
    """
    running = []

    def serve(directory: str | Path, honour_range: bool = True) -> HTTPServer:
        state = HTTPServer(root=Path(directory), url="", honour_range=honour_range)
        httpd = ThreadingHTTPServer((LOOPBACK, 0), _make_handler(state))
        httpd.daemon_threads = True
        state.url = f"http://{LOOPBACK}:{httpd.server_address[1]}"
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        running.append((httpd, thread))
        return state

    yield serve
    for httpd, thread in running:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def unused_port():
    """A loopback port with nothing listening on it (for 'unreachable' URLs)."""
    import socket
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# Small checkpoints
# --------------------------------------------------------------------------------------------

SMALL_SHAPES = {
    "model.embed.weight": (32, 16),
    "model.layers.0.attn.q_proj.weight": (16, 16),
    "model.layers.0.attn.q_proj.bias": (16,),
    "model.layers.0.mlp.up_proj.weight": (24, 16),
    "model.layers.0.mlp.down_proj.weight": (16, 24),
    "model.norm.weight": (16,),
}


class Checkpoints:
    """Write small base/expert checkpoints in the layouts the loaders accept."""

    def __init__(self, root: Path):
        self.root = root

    @staticmethod
    def weights(seed: int, shapes: dict[str, tuple[int, ...]] | None = None, dtype=torch.float32,
                scale: float = 1.0) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {k: (torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype)
                for k, s in (shapes or SMALL_SHAPES).items()}

    def family(self, n_experts: int = 2, shapes=None, dtype=torch.float32, delta: float = 0.1):
        """A base and ``n_experts`` experts near it: ``(base, [expert, ...])`` as tensor dicts."""
        base = self.weights(0, shapes, dtype)
        experts = []
        for t in range(n_experts):
            d = self.weights(100 + t, shapes, dtype, scale=delta)
            experts.append({k: (base[k].double() + d[k].double()).to(dtype) for k in base})
        return base, experts

    def file(self, tensors: dict[str, torch.Tensor], rel: str) -> str:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        return str(path)

    def directory(self, tensors: dict[str, torch.Tensor], rel: str, *, shards: int = 1,
                  side_files: dict[str, str | bytes] | None = None) -> str:
        """A model directory: ``model.safetensors``, or ``shards`` shards plus an index."""
        d = self.root / rel
        d.mkdir(parents=True, exist_ok=True)
        if shards <= 1:
            self.file(tensors, f"{rel}/model.safetensors")
        else:
            self.sharded(tensors, d, shards)
        for name, content in (side_files or {}).items():
            (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(d)

    @staticmethod
    def sharded(tensors: dict[str, torch.Tensor], d: Path, shards: int) -> str:
        keys = list(tensors)
        n = len(keys)
        groups = [keys[i * n // shards:(i + 1) * n // shards] for i in range(shards)]
        weight_map = {}
        total = 0
        for i, group in enumerate(groups):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: tensors[k].contiguous() for k in group}, str(d / name))
            for k in group:
                weight_map[k] = name
                total += tensors[k].numel() * tensors[k].element_size()
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
        return str(d / "model.safetensors.index.json")


@pytest.fixture
def checkpoints(tmp_path) -> Checkpoints:
    return Checkpoints(tmp_path / "ckpts")


def merge_spec(base: str, experts: list[str], out: str, method: str = "task_arithmetic", params: dict | None = None,
               **output) -> dict:
    """A spec dict in the public format (see merging/spec.py)."""
    return {"method": method, "params": {"alpha": 0.5} if params is None and method == "task_arithmetic" else (params or {}),
            "base": {"uri": base}, "experts": [{"uri": e} for e in experts],
            "output": {"uri": out, **output}, "options": {"device": "cpu"}}


@pytest.fixture
def spec():
    """``spec(base, experts, out, method=..., params=..., **output_fields) -> dict``."""
    return merge_spec

#!/usr/bin/env python3
"""API latency under polling load: GET /v1/merges/{id} while a merge runs, plus a stream of submits.

Starts ``submerge serve`` (embedded mode: SQLite, in-process pool) in a subprocess on a free
loopback port with a temporary data directory, writes small synthetic checkpoints, submits one
merge that runs for a while (``SUBMERGE_DEBUG_STEP_DELAY`` per tensor), then for ``--duration``
seconds runs ``--pollers`` concurrent pollers (one httpx.AsyncClient, each poller GETs the running
job every ``--poll-interval`` seconds, 0 = back to back) and a submitter POSTing a new job every
``--submit-interval`` seconds (they queue behind the running one and are cancelled at the end).
Prints p50/p90/p99/max per route, and with ``--results FILE`` appends a "## API latency" section.

    .venv/bin/python bench/api_latency.py [--pollers 200] [--duration 20] [--results bench/RESULTS.md]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
POLL_P99_TARGET_MS, SUBMIT_P99_TARGET_MS = 50.0, 100.0


def write_checkpoints(root: Path, tensors: int, size: int) -> tuple[str, list[str]]:
    import torch
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(size, size, generator=g) for i in range(tensors)}
    save_file(base, str(root / "base.safetensors"))
    experts = []
    for t in range(2):
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(root / f"e{t}.safetensors"))
        experts.append(str(root / f"e{t}.safetensors"))
    return str(root / "base.safetensors"), experts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(url: str, server: subprocess.Popen, failure=lambda: "the API did not start") -> None:
    """Poll ``url``/healthz until it answers 200; SystemExit with ``failure()`` when the server exits or
    60 s pass."""
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline or server.poll() is not None:
            raise SystemExit(failure())
        time.sleep(0.1)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


class RawConnection:
    """One keep-alive HTTP/1.1 connection driven with asyncio streams.

    httpx's AsyncClient costs ~2.5 ms of client CPU per request, so with 200 pollers on 2 cores the
    load generator itself was the bottleneck (RESULTS.md, first runs); this client costs a few tens
    of microseconds, leaving the CPU to the server and the merge being measured.
    """

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        header = await self.reader.readuntil(b"\r\n\r\n")
        status = int(header.split(b" ", 2)[1])
        length, close = 0, False
        for line in header.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        data = await self.reader.readexactly(length)
        if close:
            self.writer.close()
            self.reader = self.writer = None
        return status, data


class HttpxConnection:
    """The same ``request`` interface over a shared ``httpx.AsyncClient`` (``--client httpx``)."""

    def __init__(self, client: httpx.AsyncClient):
        self.client = client

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        headers = {"content-type": "application/json"} if body is not None else None
        r = await self.client.request(method, path, content=body, headers=headers)
        return r.status_code, r.content


async def run_load(url: str, job_id: str, body: dict, args) -> dict:
    """``args.pollers`` pollers and one submitter for ``args.duration`` s, each on its own
    connection (raw) or on one pooled httpx client; then cancels every job it made."""
    import json as _json
    lat: dict[str, list[float]] = {"poll": [], "submit": []}
    errors: dict[str, int] = {"poll": 0, "submit": 0}
    submitted: list[str] = []
    payload = _json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    limits = httpx.Limits(max_connections=args.pollers + 10, max_keepalive_connections=args.pollers + 10)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        def connection():
            return RawConnection(host, int(port)) if args.client == "raw" else HttpxConnection(client)
        end = time.perf_counter() + args.duration

        async def poller():
            conn = connection()
            await asyncio.sleep(random.random() * (args.poll_interval or 0.01))  # spread the phases
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                status, _ = await conn.request("GET", f"/v1/merges/{job_id}")
                dt = time.perf_counter() - t0
                if status == 200:
                    lat["poll"].append(dt)
                else:
                    errors["poll"] += 1
                if args.poll_interval:
                    await asyncio.sleep(max(0.0, args.poll_interval - dt))

        async def submitter():
            conn = connection()
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                status, data = await conn.request("POST", "/v1/merges", payload)
                dt = time.perf_counter() - t0
                if status == 202:
                    lat["submit"].append(dt)
                    submitted.append(_json.loads(data)["id"])
                else:
                    errors["submit"] += 1
                await asyncio.sleep(max(0.0, args.submit_interval - dt))

        t_start = time.perf_counter()
        await asyncio.gather(*(poller() for _ in range(args.pollers)), submitter())
        wall = time.perf_counter() - t_start
        job = (await client.get(f"/v1/merges/{job_id}")).json()
        for jid in submitted + [job_id]:
            await client.post(f"/v1/merges/{jid}:cancel")
    return {"lat": lat, "errors": errors, "wall": wall, "job": job}


def server_cpu(pid: int) -> float:
    """user + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _server_stack() -> str:
    try:
        import httptools  # noqa: F401
        import uvloop  # noqa: F401
        return "uvloop + httptools"
    except ImportError:
        return "asyncio + h11"


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pollers", type=int, default=200)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--poll-interval", type=float, default=0.5, help="seconds between one poller's GETs (0: back to back)")
    ap.add_argument("--submit-interval", type=float, default=0.2, help="seconds between submits")
    ap.add_argument("--tensors", type=int, default=400)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--method", default="task_arithmetic", help="method of the merge being polled")
    ap.add_argument("--merge-workers", type=int, help="options.workers of the polled merge (default: the engine's)")
    ap.add_argument("--worker-nice", type=int, help="SUBMERGE_WORKER_NICE for the server (default: the setting's default, 10)")
    ap.add_argument("--cpu-bound", action="store_true",
                    help="no SUBMERGE_DEBUG_STEP_DELAY: the polled merge really computes (use e.g. --method tsv_m "
                         "--size 768 --tensors 150 so that it outlives the run)")
    ap.add_argument("--client", choices=["raw", "httpx"], default="raw",
                    help="load generator: raw asyncio HTTP/1.1 (cheap, default) or httpx.AsyncClient")
    ap.add_argument("--results", help="append a '## API latency' section to this markdown file")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="submerge-latency-") as tmp:
        root = Path(tmp)
        base, experts = write_checkpoints(root, args.tensors, args.size)
        delay = 0.0 if args.cpu_bound else (args.duration + 15) / args.tensors  # the job outlives the measurement
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SUBMERGE_")}
        env.update(SUBMERGE_DATA_DIR=str(root / "data"), SUBMERGE_FILE_ROOTS=str(root), SUBMERGE_AUTH="off",
                   SUBMERGE_DEBUG_STEP_DELAY=str(delay), PYTHONPATH=str(REPO))
        if args.worker_nice is not None:
            env["SUBMERGE_WORKER_NICE"] = str(args.worker_nice)
        server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                                   "--log-level", "warning"], cwd=root, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_serving(url, server)
            body = {"method": args.method, "params": {"alpha": 0.5}, "base": {"uri": base},
                    "experts": [{"uri": e} for e in experts],
                    "options": {"device": "cpu", **({"workers": args.merge_workers} if args.merge_workers else {})}}
            job_id = httpx.post(f"{url}/v1/merges", json=body, timeout=30).json()["id"]
            while httpx.get(f"{url}/v1/merges/{job_id}").json()["status"] != "running":
                time.sleep(0.05)
            cpu0, srv0 = time.process_time(), server_cpu(server.pid)
            out = asyncio.run(run_load(url, job_id, body, args))
            out["cpu"] = {"client": time.process_time() - cpu0, "server": server_cpu(server.pid) - srv0}
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()

    lat, errors, wall, job = out["lat"], out["errors"], out["wall"], out["job"]
    rows = []
    for name, target in (("poll", POLL_P99_TARGET_MS), ("submit", SUBMIT_P99_TARGET_MS)):
        ms = [x * 1000 for x in lat[name]]
        rows.append((name, len(ms), len(ms) / wall, pct(ms, 50), pct(ms, 90), pct(ms, 99), max(ms) if ms else float("nan"),
                     errors[name], target, pct(ms, 99) < target))
    header = "| route | requests | req/s | p50 ms | p90 ms | p99 ms | max ms | errors | p99 target | met |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    labels = {"poll": "GET /v1/merges/{id}", "submit": "POST /v1/merges"}
    for name, n, rate, p50, p90, p99, mx, err, target, ok in rows:
        lines.append(f"| {labels[name]} | {n} | {rate:.0f} | {p50:.1f} | {p90:.1f} | {p99:.1f} | {mx:.1f} | {err} | "
                     f"< {target:.0f} ms | {'yes' if ok else 'NO'} |")
    table = "\n".join(lines)
    print(table)
    cpu = out["cpu"]
    cpu_line = (f"CPU over the {wall:.1f} s run: server process {cpu['server']:.1f} s ({cpu['server'] / wall:.0%} of one core), "
                f"load generator {cpu['client']:.1f} s ({cpu['client'] / wall:.0%} of one core)")
    print(cpu_line)
    print(f"job still {job['status']} (phase {job['phase']}, progress {job['progress']}) at the end of the run")
    if args.results:
        cmd = " ".join(["python", "bench/api_latency.py", *map(shlex.quote, sys.argv[1:])])
        section = f"""
## API latency

`{cmd}` ({time.strftime('%Y-%m-%d')})

Machine: {machine()}. Embedded mode (`submerge serve`: one uvicorn process, SQLite job store, the
in-process pool running the merge being polled: {args.method} over {args.tensors} tensors of
{args.size}×{args.size}, {"computing flat out (--cpu-bound)" if args.cpu_bound else "slowed by SUBMERGE_DEBUG_STEP_DELAY"}, SUBMERGE_WORKER_NICE
{args.worker_nice if args.worker_nice is not None else "10 (default)"}), client ({args.client}) in another process on the
same machine; uvicorn with {_server_stack()}.
Load for {args.duration:.0f} s: {args.pollers} concurrent pollers, each GETting the running job every
{args.poll_interval} s ({"back to back" if not args.poll_interval else f"{args.pollers / args.poll_interval:.0f} req/s offered"}),
plus one submitter POSTing a job every {args.submit_interval} s (queued behind the running one).

{table}

{cpu_line}.

Targets: poll p99 < {POLL_P99_TARGET_MS:.0f} ms: **{'met' if rows[0][-1] else 'not met'}**; submit p99 < {SUBMIT_P99_TARGET_MS:.0f} ms: **{'met' if rows[1][-1] else 'not met'}**.
"""
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(section)
        print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

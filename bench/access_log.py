#!/usr/bin/env python3
"""Throughput cost of the access log: requests/s of ``submerge serve`` with SUBMERGE_ACCESS_LOG on and off.

Starts ``submerge serve`` (embedded mode, ``--log-level info``, stderr to a file as a log collector
would take it) in a subprocess for each run, then for ``--duration`` seconds ``--connections``
keep-alive connections send ``GET --path`` back to back (the raw asyncio client of
bench/api_latency.py, a few tens of microseconds of client CPU per request). Runs alternate
between the settings, ``--repeats`` times each, so a noisy machine hurts both alike; prints each
run and the medians. ``--server-pythonpath DIR`` runs another checkout's server (e.g. an export
of an older commit) as a third setting, ``before``.

    .venv/bin/python bench/access_log.py [--path /v1/methods] [--connections 8] [--duration 10] [--repeats 3]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from api_latency import RawConnection, free_port, machine, server_cpu, wait_serving  # bench/ is sys.path[0] when run as a script

REPO = Path(__file__).resolve().parents[1]


async def load(port: int, path: str, connections: int, duration: float) -> tuple[int, int, float]:
    """(answered 200, other answers, wall seconds) of `connections` back-to-back GET loops."""
    ok = other = 0
    end = time.perf_counter() + duration

    async def loop():
        nonlocal ok, other
        conn = RawConnection("127.0.0.1", port)
        while time.perf_counter() < end:
            status, _ = await conn.request("GET", path)
            if status == 200:
                ok += 1
            else:
                other += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(connections)))
    return ok, other, time.perf_counter() - t0


def run_once(setting: str, args, tmp: Path) -> dict:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUBMERGE_")}
    env.update(SUBMERGE_DATA_DIR=str(tmp / f"data-{setting}"), SUBMERGE_AUTH="off",
               SUBMERGE_ACCESS_LOG="false" if setting == "off" else "true",
               PYTHONPATH=args.server_pythonpath if setting == "before" else str(REPO))
    log = tmp / f"stderr-{setting}.log"
    with open(log, "wb") as stderr:
        server = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                                   "--log-level", "info"], cwd=tmp, env=env, stdout=stderr, stderr=stderr)
        try:
            wait_serving(f"http://127.0.0.1:{port}", server,
                         failure=lambda: f"the API did not start ({setting}): {log.read_text()[-2000:]}")
            asyncio.run(load(port, args.path, args.connections, 1.0))  # warm-up
            cpu0 = server_cpu(server.pid)
            ok, other, wall = asyncio.run(load(port, args.path, args.connections, args.duration))
            cpu = server_cpu(server.pid) - cpu0
        finally:
            server.terminate()
            server.wait(timeout=30)
    text = log.read_text(errors="replace")
    return {"setting": setting, "rps": ok / wall, "errors": other, "cpu_ms": 1000 * cpu / max(ok, 1),
            "log_bytes": len(text.encode()), "logging_errors": text.count("--- Logging error ---")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", default="/v1/methods")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--server-pythonpath", help="also run the server from this checkout (setting 'before')")
    args = ap.parse_args()
    settings = ["on", "off"] + (["before"] if args.server_pythonpath else [])
    print(f"machine: {machine()}")
    runs = []
    with tempfile.TemporaryDirectory(prefix="submerge-accesslog-") as tmp:
        for i in range(args.repeats):
            for setting in settings:
                r = run_once(setting, args, Path(tmp))
                runs.append(r)
                print(f"run {i + 1} {setting:>6}: {r['rps']:7.0f} req/s, server CPU {r['cpu_ms']:.2f} ms/request, "
                      f"{r['errors']} non-200, log {r['log_bytes']} bytes, {r['logging_errors']} logging errors", flush=True)
    print("| access log | req/s (median) | runs | server CPU per request (median) | logging errors |")
    print("|---|---:|---|---:|---:|")
    for setting in settings:
        mine = [r for r in runs if r["setting"] == setting]
        each = ", ".join(f"{r['rps']:.0f}" for r in mine)
        print(f"| {setting} | {statistics.median(r['rps'] for r in mine):.0f} | {each} | "
              f"{statistics.median(r['cpu_ms'] for r in mine):.2f} ms | {sum(r['logging_errors'] for r in mine)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

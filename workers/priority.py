"""Run merges at a lower CPU priority than the API.

A merge keeps every core busy (torch's threads). On a machine that also serves the API (embedded
mode, or a worker beside the gateway) the API's request threads then wait behind it: at 200
pollers its p99 went from 20 ms to 52 ms while a TSV-M merge ran (bench/RESULTS.md, API
latency). Lowering the worker's priority by ``SUBMERGE_WORKER_NICE`` (default 10) leaves the merge
all the idle CPU and gives the API the cores when it needs them.

On Linux a thread is a schedulable task of its own, so the embedded pool lowers only its worker
threads (and the OpenMP threads torch creates from them), never the API's. A Celery worker lowers
its whole process before forking its pool.
"""
from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("submerge.worker")


def _lower(who: int, nice: int) -> int | None:
    try:
        current = os.getpriority(os.PRIO_PROCESS, who)
        target = min(19, current + nice)
        os.setpriority(os.PRIO_PROCESS, who, target)
        return target
    except (OSError, AttributeError) as e:  # not Linux/Unix, or not permitted: run at normal priority
        log.warning("cannot lower the worker's CPU priority by %d: %s", nice, e)
        return None


def lower_thread_priority(nice: int) -> int | None:
    """Lower the calling thread's priority (Linux: a thread is its own task). Returns the new nice value."""
    if nice <= 0:
        return None
    return _lower(threading.get_native_id(), nice)


def lower_process_priority(nice: int) -> int | None:
    """Lower this process's priority (inherited by the processes it forks afterwards)."""
    if nice <= 0:
        return None
    return _lower(0, nice)

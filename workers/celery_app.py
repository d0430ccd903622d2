"""The Celery worker process: ``celery -A workers.celery_app worker`` or ``submerge worker``.

``app`` is ``workers.broker.make_celery`` with the settings of the environment (its delivery
guarantees are described there). The worker's signals migrate the job store at start, lower the
worker's CPU priority before the pool forks, give each pool process its own database connections
and GPU, and run the reaper beside the worker (workers/reaper.py: requeue jobs of lost workers,
send again the queued jobs whose message the broker lost).
"""
from __future__ import annotations

import logging
import sys

import torch
from billiard.process import current_process
from celery import signals

from workers.broker import TASK_NAME, make_celery
from workers.config import get_settings
from workers.dispatch import CeleryDispatcher
from workers.jobs.db import dispose_all, upgrade
from workers.jobs.store import JobStore
from workers.priority import lower_process_priority
from workers.reaper import Reaper

log = logging.getLogger("submerge.worker")

app = make_celery(get_settings())
_reaper = None


@signals.worker_init.connect(weak=False)
def _on_worker_init(sender=None, **_):
    settings = app.conf.submerge_settings
    upgrade(settings.db_url)
    dispose_all()  # no connections shared with forked pool processes
    lower_process_priority(settings.worker_nice)  # before the pool forks: its processes inherit it


@signals.worker_ready.connect(weak=False)
def _on_worker_ready(sender=None, **_):
    global _reaper
    settings = app.conf.submerge_settings
    _reaper = Reaper(settings, JobStore(settings.db_url), CeleryDispatcher(settings))
    _reaper.start()


@signals.worker_shutdown.connect(weak=False)
def _on_worker_shutdown(sender=None, **_):
    if _reaper is not None:
        _reaper.stop()


@signals.worker_process_init.connect(weak=False)
def _on_process_init(**_):
    dispose_all()
    try:  # one GPU per pool process (concurrency defaults to the GPU count)
        if torch.cuda.is_available():
            index = getattr(current_process(), "index", 0) or 0
            torch.cuda.set_device(index % torch.cuda.device_count())
    except Exception:  # noqa: BLE001
        log.exception("cannot pick a GPU for this worker process")


def main(argv: list[str] | None = None) -> int:
    """``submerge worker [celery worker options]``."""
    settings = app.conf.submerge_settings
    if not settings.redis_url:
        print("submerge: error: unavailable: SUBMERGE_REDIS_URL is not set (without it, `submerge serve` runs jobs in-process)",
              file=sys.stderr)
        return 2
    argv = list(argv or [])
    args = ["worker", "--queues", settings.queue, "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
    if not any(a in ("-c", "--concurrency") or a.startswith("--concurrency=") for a in argv):
        args += ["--concurrency", str(settings.concurrency())]
    app.worker_main(args + argv)
    return 0


__all__ = ["TASK_NAME", "app", "main", "make_celery"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Celery on Redis. ``celery -A workers.celery_app worker`` or ``submerge worker``.

Delivery guarantees: ``acks_late`` with prefetch 1, so a message is only acknowledged once its
job is done; Redis' ``visibility_timeout`` is longer than the hard time limit, so a message is
never redelivered while its job may still run. Double execution is prevented independently by
the job store's claim (``JobStore.claim``): a redelivered message for a running or finished job
does nothing. A worker that dies (OOM, SIGKILL) stops renewing its job's lease; the reaper (in
the API and in every worker) requeues the job, or fails it with ``worker_lost`` after
``SUBMERGE_MAX_ATTEMPTS`` attempts, so a job that kills its worker does not loop. The reaper
also sends again every queued job whose message the broker lost (service/reaper.py: the job
store, not Redis, says what must run).
"""
from __future__ import annotations

import logging
import sys

from celery import Celery, signals

from service.config import Settings, get_settings

TASK_NAME = "submerge.run_job"
log = logging.getLogger("submerge.worker")


def make_celery(settings: Settings) -> Celery:
    app = Celery("submerge", broker=settings.redis_url or "redis://127.0.0.1:6379/0", set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_reject_on_worker_lost=False,  # retries come from the job store's lease + attempt cap, not redelivery
        task_ignore_result=True,           # the job record lives in the job store
        task_soft_time_limit=settings.job_soft_time_limit,
        task_time_limit=settings.hard_time_limit,
        task_default_queue=settings.queue,
        broker_transport_options={"visibility_timeout": settings.hard_time_limit + 3600},
        broker_connection_retry_on_startup=True,
        worker_concurrency=settings.concurrency(),
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    app.conf.submerge_settings = settings

    @app.task(name=TASK_NAME, acks_late=True, ignore_result=True)
    def run_merge_job(job_id: str) -> str:
        from workers.tasks import run_job
        return run_job(job_id, app.conf.submerge_settings)

    return app


app = make_celery(get_settings())
_reaper = None


@signals.worker_init.connect(weak=False)
def _on_worker_init(sender=None, **_):
    from service.db import dispose_all, upgrade
    settings = app.conf.submerge_settings
    upgrade(settings.db_url)
    dispose_all()  # no connections shared with forked pool processes
    from workers.priority import lower_process_priority
    lower_process_priority(settings.worker_nice)  # before the pool forks: its processes inherit it


@signals.worker_ready.connect(weak=False)
def _on_worker_ready(sender=None, **_):
    global _reaper
    from service.dispatch import CeleryDispatcher
    from service.reaper import Reaper
    from service.store import JobStore
    settings = app.conf.submerge_settings
    _reaper = Reaper(settings, JobStore(settings.db_url), CeleryDispatcher(settings))
    _reaper.start()


@signals.worker_shutdown.connect(weak=False)
def _on_worker_shutdown(sender=None, **_):
    if _reaper is not None:
        _reaper.stop()


@signals.worker_process_init.connect(weak=False)
def _on_process_init(**_):
    from service.db import dispose_all
    dispose_all()
    try:  # one GPU per pool process (concurrency defaults to the GPU count)
        import torch
        if torch.cuda.is_available():
            from billiard.process import current_process
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

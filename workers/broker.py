"""Celery on Redis: ``make_celery(settings)``, the Celery app both sides use: the API and the
reaper send ``TASK_NAME`` messages through it (``workers.dispatch.CeleryDispatcher``), and the
worker process runs them (``workers.celery_app``, ``submerge worker``).

Delivery guarantees: ``acks_late`` with prefetch 1, so a message is only acknowledged once its
job is done; Redis' ``visibility_timeout`` is longer than the hard time limit, so a message is
never redelivered while its job may still run. Double execution is prevented independently by
the job store's claim (``JobStore.claim``): a redelivered message for a running or finished job
does nothing. A worker that dies (OOM, SIGKILL) stops renewing its job's lease; the reaper (in
the API and in every worker) requeues the job, or fails it with ``worker_lost`` after
``SUBMERGE_MAX_ATTEMPTS`` attempts, so a job that kills its worker does not loop. The reaper
also sends again every queued job whose message the broker lost (workers/reaper.py: the job
store, not Redis, says what must run).
"""
from __future__ import annotations

from celery import Celery

from workers.config import Settings
from workers.tasks import run_job

TASK_NAME = "submerge.run_job"


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
        return run_job(job_id, app.conf.submerge_settings)

    return app


__all__ = ["TASK_NAME", "make_celery"]

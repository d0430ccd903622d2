"""The job system: everything between a stored job and a finished model.

* ``jobs/``: the job store (tables, migrations, ``JobStore``) and the public view of a job;
* ``config`` (settings), ``storage`` (a job's folder), ``policy`` (URI policy; ``admit_spec``, the
  one check of a spec on its way in), ``redact`` (secrets out of records and logs), ``webhooks``;
* ``dispatch`` (how a queued job reaches a worker: the embedded ``pool`` or Celery through
  ``broker``), ``reaper`` (lost workers, lost messages), ``celery_app`` (the worker process),
  ``ownership`` and ``priority`` (embedded-server reclaim, CPU priority);
* ``tasks.run_job``: the one task function both Celery and the embedded pool call; it runs the job
  program (``pipeline``) and writes the reports (``report/``).

``submerge worker [celery worker options]`` calls :func:`main`.
"""
from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run a Celery worker for ``SUBMERGE_REDIS_URL`` (extra argv goes to ``celery worker``)."""
    # lazy: importing workers.celery_app builds the Celery app from the environment's settings;
    # only the worker process should do that (``import workers.jobs`` must not)
    from workers.celery_app import main as _main
    return _main(argv)


__all__ = ["main"]

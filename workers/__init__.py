"""Job workers. ``workers.tasks.run_job`` is the one task function; Celery (``workers.celery_app``)
and the embedded in-process pool (``workers.pool``) both call it.

``submerge worker [celery worker options]`` calls :func:`main`.
"""
from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run a Celery worker for ``SUBMERGE_REDIS_URL`` (extra argv goes to ``celery worker``)."""
    from workers.celery_app import main as _main
    return _main(argv)


__all__ = ["main"]

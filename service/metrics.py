"""Prometheus text exposition, written by hand from the job store (so it is the same on every API
replica, whichever worker ran the jobs)."""
from __future__ import annotations

from service.models import STATUSES


def _num(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) and not float(v).is_integer() else str(int(v))


def exposition(store, dispatcher) -> str:
    lines: list[str] = []
    counts = store.counts_by_status()
    lines += ["# HELP submerge_jobs Jobs in the job store by status.", "# TYPE submerge_jobs gauge"]
    for st in STATUSES:
        lines.append(f'submerge_jobs{{status="{st}"}} {counts.get(st, 0)}')

    buckets, total, count = store.duration_histogram()
    lines += ["# HELP submerge_job_duration_seconds Run time of finished jobs, from first start to finish.",
              "# TYPE submerge_job_duration_seconds histogram"]
    for le, n in buckets:
        lines.append(f'submerge_job_duration_seconds_bucket{{le="{_num(le)}"}} {n}')
    lines.append(f'submerge_job_duration_seconds_bucket{{le="+Inf"}} {count}')
    lines.append(f"submerge_job_duration_seconds_sum {_num(total)}")
    lines.append(f"submerge_job_duration_seconds_count {count}")

    lines += ["# HELP submerge_queue_depth Jobs waiting for a worker (queued in the job store).",
              "# TYPE submerge_queue_depth gauge", f"submerge_queue_depth {counts.get('queued', 0)}"]
    try:
        broker = dispatcher.queue_length()
    except Exception:  # noqa: BLE001 - the broker being down shows in /readyz
        broker = None
    if broker is not None:
        lines += ["# HELP submerge_broker_queue_length Messages waiting in the worker queue (Celery queue or embedded pool).",
                  "# TYPE submerge_broker_queue_length gauge", f"submerge_broker_queue_length {broker}"]
    age = store.oldest_queued_age()
    lines += ["# HELP submerge_oldest_queued_job_age_seconds Age of the oldest queued job (0 when none).",
              "# TYPE submerge_oldest_queued_job_age_seconds gauge", f"submerge_oldest_queued_job_age_seconds {_num(round(age or 0.0, 3))}"]
    return "\n".join(lines) + "\n"

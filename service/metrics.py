"""Prometheus metrics, collected from the job store at each scrape (so every API replica and
every uvicorn worker process answers the same, whichever worker ran the jobs), rendered by
``prometheus-client``."""
from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from workers.jobs.models import STATUSES

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


class JobStoreCollector:
    """A custom collector: nothing is counted in-process, every value is read when scraped."""

    def __init__(self, store, dispatcher):
        self.store, self.dispatcher = store, dispatcher

    def collect(self):
        counts = self.store.counts_by_status()
        jobs = GaugeMetricFamily("submerge_jobs", "Jobs in the job store by status.", labels=["status"])
        for status in STATUSES:
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs

        buckets, total, count = self.store.duration_histogram()
        yield HistogramMetricFamily(
            "submerge_job_duration_seconds", "Run time of finished jobs, from first start to finish.",
            buckets=[(str(float(le)), n) for le, n in buckets] + [("+Inf", count)], sum_value=total)

        yield GaugeMetricFamily("submerge_queue_depth", "Jobs waiting for a worker (queued in the job store).",
                                value=counts.get("queued", 0))
        try:
            broker = self.dispatcher.queue_length()
        except Exception:  # noqa: BLE001 - the broker being down shows in /readyz
            broker = None
        if broker is not None:
            yield GaugeMetricFamily("submerge_broker_queue_length",
                                    "Messages waiting in the worker queue (Celery queue or embedded pool).", value=broker)
        age = self.store.oldest_queued_age()
        yield GaugeMetricFamily("submerge_oldest_queued_job_age_seconds", "Age of the oldest queued job (0 when none).",
                                value=round(age or 0.0, 3))


def exposition(store, dispatcher) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobStoreCollector(store, dispatcher))
    return generate_latest(registry).decode()

"""The embedded in-process worker pool (no Redis): N threads calling ``workers.tasks.run_job``,
the same function Celery runs. On start it picks up every job still queued in the store."""
from __future__ import annotations

import logging
import queue
import threading

from service.config import Settings
from service.store import JobStore
from workers.priority import lower_thread_priority
from workers.tasks import run_job

log = logging.getLogger("submerge.pool")


class EmbeddedPool:
    def __init__(self, settings: Settings, store: JobStore):
        self.settings, self.store = settings, store
        self.size = settings.concurrency()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.size):
            t = threading.Thread(target=self._work, args=(i,), name=f"submerge-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        for job_id in self.store.queued_ids():
            self.submit(job_id)

    def submit(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._pending:
                return
            self._pending.add(job_id)
        self._queue.put(job_id)

    def backlog(self) -> int:
        return self._queue.qsize()

    def _work(self, index: int) -> None:
        # Before torch runs anything here, so the OpenMP threads it starts inherit the lower priority.
        lower_thread_priority(self.settings.worker_nice)
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.set_device(index % torch.cuda.device_count())  # one job per GPU
        except Exception:  # noqa: BLE001
            pass
        while True:
            job_id = self._queue.get()
            if job_id is None or self._stop.is_set():
                return
            with self._lock:
                self._pending.discard(job_id)
            try:
                run_job(job_id, self.settings, stop_event=self._stop)
            except Exception:  # noqa: BLE001
                log.exception("job %s: task crashed", job_id)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs; a running job is interrupted and put back in the queue for the next start."""
        self._stop.set()
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=timeout)

"""The embedded in-process worker pool (no Redis): N threads calling ``workers.tasks.run_job``,
the same function Celery runs. On start it requeues the jobs an earlier embedded server of this
data directory left running when it died (``workers.ownership``: no need to wait out their
leases), then picks up every job queued in the store."""
from __future__ import annotations

import logging
import queue
import threading

import torch

from workers.config import Settings
from workers.jobs.store import JobStore
from workers.ownership import EmbeddedOwnership
from workers.priority import lower_thread_priority
from workers.tasks import run_job, settle

log = logging.getLogger("submerge.pool")


class EmbeddedPool:
    def __init__(self, settings: Settings, store: JobStore):
        self.settings, self.store = settings, store
        self.size = settings.concurrency()
        self.ownership = EmbeddedOwnership(settings.data_path)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._pending: set[str] = set()
        self._active: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._reclaim()
        for i in range(self.size):
            t = threading.Thread(target=self._work, args=(i,), name=f"submerge-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        for job_id in self.store.queued_ids():
            self.submit(job_id)

    def _reclaim(self) -> None:
        """Settle the jobs a dead earlier server of this data directory still holds, as the reaper
        would once their leases ran out (the crashed attempt counts)."""
        try:
            alone = self.ownership.acquire()
        except OSError:  # e.g. a read-only data directory: no reclaim; leases still expire
            log.exception("cannot lock %s; jobs of an earlier server wait for their leases", self.ownership.path)
            return
        try:
            if alone:
                reaped = self.store.reclaim(self.ownership.owner)
                for r in reaped:
                    log.warning("job %s: its server died while running it -> %s", r.job_id, r.outcome)
                settle(reaped, self.settings, self.store)
        except Exception:  # noqa: BLE001 - the reaper still settles them when their leases run out
            log.exception("cannot reclaim the jobs of an earlier server")
        finally:
            self.ownership.share()

    def submit(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._pending:
                return
            self._pending.add(job_id)
        self._queue.put(job_id)

    def backlog(self) -> int:
        return self._queue.qsize()

    def waiting(self) -> set[str]:
        """Jobs waiting in the pool or being run by it (the reaper's sweep leaves them alone)."""
        with self._lock:
            return self._pending | self._active

    def _work(self, index: int) -> None:
        # Before torch runs anything here, so the OpenMP threads it starts inherit the lower priority.
        lower_thread_priority(self.settings.worker_nice)
        try:
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
                self._active.add(job_id)
            try:
                run_job(job_id, self.settings, stop_event=self._stop, owner=self.ownership.owner)
            except Exception:  # noqa: BLE001
                log.exception("job %s: task crashed", job_id)
            finally:
                with self._lock:
                    self._active.discard(job_id)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs; a running job is interrupted and put back in the queue for the next start."""
        self._stop.set()
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=timeout)
        self.ownership.release()

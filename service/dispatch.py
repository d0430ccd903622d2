"""How a queued job reaches a worker: the embedded in-process pool, or Celery on Redis.

Both run the same task function, ``workers.tasks.run_job``.
"""
from __future__ import annotations

import logging
import threading

from service.config import Settings
from service.store import JobStore

log = logging.getLogger("submerge.dispatch")


class Dispatcher:
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def submit(self, job_id: str) -> None: raise NotImplementedError
    def queue_length(self) -> int | None: return None
    def ping(self) -> None: ...


class EmbeddedDispatcher(Dispatcher):
    def __init__(self, settings: Settings, store: JobStore):
        from workers.pool import EmbeddedPool
        self.pool = EmbeddedPool(settings, store)

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> None:
        self.pool.stop()

    def submit(self, job_id: str) -> None:
        self.pool.submit(job_id)

    def queue_length(self) -> int | None:
        return self.pool.backlog()


class CeleryDispatcher(Dispatcher):
    def __init__(self, settings: Settings):
        from workers.celery_app import make_celery
        self.settings = settings
        self.app = make_celery(settings)
        self._redis = None

    def submit(self, job_id: str) -> None:
        from workers.celery_app import TASK_NAME
        self.app.send_task(TASK_NAME, args=[job_id], queue=self.settings.queue)

    def _client(self):
        if self._redis is None:
            import redis
            self._redis = redis.Redis.from_url(self.settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        return self._redis

    def queue_length(self) -> int | None:
        return int(self._client().llen(self.settings.queue))

    def ping(self) -> None:
        self._client().ping()

    def stop(self) -> None:
        if self._redis is not None:
            self._redis.close()


def make_dispatcher(settings: Settings, store: JobStore) -> Dispatcher:
    return EmbeddedDispatcher(settings, store) if settings.embedded else CeleryDispatcher(settings)


class Reaper:
    """Looks for jobs whose worker stopped heartbeating: requeues them (dispatching them again),
    or fails them with worker_lost after max_attempts. Runs in the API and in every Celery worker;
    the store's conditional updates make concurrent reapers safe."""

    def __init__(self, settings: Settings, store: JobStore, dispatcher: Dispatcher):
        self.settings, self.store, self.dispatcher = settings, store, dispatcher
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="submerge-reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def run_once(self) -> list:
        reaped = self.store.reap()
        for r in reaped:
            log.warning("job %s: worker lost its lease -> %s", r.job_id, r.outcome)
            if r.outcome == "requeued":
                try:
                    self.dispatcher.submit(r.job_id)
                except Exception:  # noqa: BLE001 - the next pass cannot see it (queued): fail it instead
                    log.exception("job %s: cannot dispatch retry", r.job_id)
            else:  # failed for good: a failed job keeps nothing in storage (the lost attempt may have left files)
                from service.storage import Storage
                from service.webhooks import deliver_async
                try:
                    Storage(self.settings).clear_job(r.job_id)
                except Exception:  # noqa: BLE001 - storage trouble must not stop the reaper
                    log.exception("job %s: cannot remove what the lost attempt left", r.job_id)
                deliver_async(r.job_id, self.settings, self.store)
        return reaped

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.reaper_interval):
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - keep reaping after a database hiccup
                log.exception("reaper pass failed")

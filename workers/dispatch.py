"""How a queued job reaches a worker: the embedded in-process pool, or Celery on Redis.

Both run the same task function, ``workers.tasks.run_job``. ``send`` is how every caller (submit,
the reaper) hands a job over: it stamps ``dispatched_at`` first, so the reaper's sweep
(workers/reaper.py) can tell a job whose message was lost from one whose message still waits
(``Dispatcher.waiting``). ``make_dispatcher`` picks the one the settings ask for.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from dataclasses import dataclass

import redis

from workers.broker import TASK_NAME, make_celery
from workers.config import Settings
from workers.jobs.store import JobStore
from workers.pool import EmbeddedPool

log = logging.getLogger("submerge.dispatch")

# Most messages one look at the Celery queue reads (about 1 KB each): a longer queue is reported
# incomplete, and jobs dispatched earlier are then assumed to be in the part not read.
SCAN_LIMIT = 2000


@dataclass(frozen=True)
class Waiting:
    """Jobs with a message waiting for a worker; ``complete``: no other job has one."""
    ids: frozenset[str]
    complete: bool


class Dispatcher:
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def submit(self, job_id: str) -> None: raise NotImplementedError
    def queue_length(self) -> int | None: return None
    def ping(self) -> None: ...
    # Which jobs have a message waiting. Unknown here: the sweep then re-sends only jobs never sent.
    def waiting(self) -> Waiting: return Waiting(frozenset(), False)


class EmbeddedDispatcher(Dispatcher):
    def __init__(self, settings: Settings, store: JobStore):
        self.pool = EmbeddedPool(settings, store)

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> None:
        self.pool.stop()

    def submit(self, job_id: str) -> None:
        self.pool.submit(job_id)

    def queue_length(self) -> int | None:
        return self.pool.backlog()

    def waiting(self) -> Waiting:
        return Waiting(frozenset(self.pool.waiting()), True)


class CeleryDispatcher(Dispatcher):
    def __init__(self, settings: Settings):
        self.settings = settings
        self.app = make_celery(settings)
        self._redis = None

    def submit(self, job_id: str) -> None:
        self.app.send_task(TASK_NAME, args=[job_id], queue=self.settings.queue, task_id=task_id(job_id))

    def _client(self):
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        return self._redis

    def queue_length(self) -> int | None:
        return int(self._client().llen(self.settings.queue))

    def ping(self) -> None:
        self._client().ping()

    def waiting(self) -> Waiting:
        """The jobs of the messages in the queue's Redis list, where kombu's Redis transport keeps
        each message (JSON, the task id in its headers) until a worker takes it. The oldest
        SCAN_LIMIT are read: workers take from that end, and the sweep looks for old jobs."""
        with self._client().pipeline() as p:  # MULTI: the length belongs to the messages read
            p.llen(self.settings.queue)
            p.lrange(self.settings.queue, -SCAN_LIMIT, -1)
            length, raw = p.execute()
        ids = set()
        for message in raw:
            try:
                ids.add(job_of(json.loads(message)["headers"]["id"]))
            except (ValueError, KeyError, TypeError, AttributeError):  # not a task message: skip it
                continue
        return Waiting(frozenset(ids), complete=length <= SCAN_LIMIT)

    def stop(self) -> None:
        if self._redis is not None:
            self._redis.close()


def make_dispatcher(settings: Settings, store: JobStore) -> Dispatcher:
    return EmbeddedDispatcher(settings, store) if settings.embedded else CeleryDispatcher(settings)


def task_id(job_id: str) -> str:
    """A Celery task id that names its job (``job_of`` reads it back), unique per message."""
    return f"{job_id}.{uuid.uuid4().hex[:12]}"


def job_of(celery_id: str) -> str:
    return celery_id.rpartition(".")[0]


def send(store: JobStore, dispatcher: Dispatcher, job_id: str, expected: dt.datetime | None = None) -> bool:
    """Hand a queued job to the queue: stamp ``dispatched_at`` if it is still ``expected`` (None:
    not dispatched), then send. False when the job is no longer queued or another sender won the
    stamp. The stamp comes first so that a crash between the two leaves a job the sweep re-sends
    (stamped, no message) rather than a message the store does not know about. A failed send
    removes the stamp and raises: the job stays queued, and the next sweep sends it."""
    stamp = store.mark_dispatched(job_id, expected)
    if stamp is None:
        return False
    try:
        dispatcher.submit(job_id)
    except Exception:
        try:
            store.unmark_dispatched(job_id, stamp)
        except Exception:  # noqa: BLE001 - the stamp then only delays the sweep's retry to requeue_after
            log.exception("job %s: cannot clear its dispatch stamp", job_id)
        raise
    return True

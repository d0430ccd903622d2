"""The reaper: one loop, in the API and in every Celery worker, that keeps the queue in step with
the job store (the store is the source of truth, the queue only carries messages).

* ``reap``: a job whose worker stopped renewing its lease is queued again and re-sent, or failed
  with worker_lost after max_attempts, or cancelled when a cancel was pending;
* ``sweep``: a queued job with no message waiting for a worker is sent again: never sent (the
  broker was down at submit or at a retry) after a short grace, or sent more than
  ``SUBMERGE_REQUEUE_AFTER`` seconds ago and no longer in the queue (Redis lost its data, a
  message was acknowledged by a worker that released the job).

Concurrent reapers are safe: the store's conditional updates settle a job once, the dispatch
stamp lets one of them send, and a duplicate message is harmless anyway (``JobStore.claim``).
"""
from __future__ import annotations

import logging
import threading

from workers.config import Settings
from workers.dispatch import Dispatcher, send
from workers.jobs.store import JobStore, Reaped
from workers.tasks import settle

log = logging.getLogger("submerge.reaper")

# A job not dispatched yet is left this long (at most requeue_after) to whoever queued it (submit,
# the reaper's own retry), which sends it a moment later: the sweep repairs, it does not race them.
DISPATCH_GRACE = 5.0


class Reaper:
    """The loop; ``dispatcher`` is how it sends (``workers.dispatch``: the embedded pool or Celery)."""

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

    def run_once(self) -> list[Reaped]:
        reaped = self.store.reap()
        for r in reaped:
            log.warning("job %s: worker lost its lease -> %s", r.job_id, r.outcome)
        settle(reaped, self.settings, self.store)
        for r in reaped:
            if r.outcome == "requeued":
                try:
                    send(self.store, self.dispatcher, r.job_id)
                except Exception as e:  # noqa: BLE001 - the job stays queued, unsent: the sweep sends it later
                    log.warning("job %s: cannot send the retry (%s: %s); the sweep retries", r.job_id, type(e).__name__, e)
        self.sweep()
        return reaped

    def sweep(self) -> list[str]:
        """Send again the queued jobs that have no message waiting; returns their ids."""
        s = self.settings
        candidates = self.store.requeue_candidates(s.requeue_after, min(s.requeue_after, DISPATCH_GRACE))
        if not candidates:
            return []
        try:
            waiting = self.dispatcher.waiting()
        except Exception as e:  # noqa: BLE001 - broker down: sending would fail too; the next pass looks again
            log.warning("cannot read the queue (%s: %s); %d queued job(s) wait for the next pass",
                        type(e).__name__, e, len(candidates))
            return []
        sent = []
        for job_id, stamp in candidates:
            # Skip a job whose message waits, or may wait in the part of a long queue not read.
            if job_id in waiting.ids or (stamp is not None and not waiting.complete):
                continue
            try:
                if send(self.store, self.dispatcher, job_id, expected=stamp):
                    sent.append(job_id)
            except Exception as e:  # noqa: BLE001 - the broker is down: the rest would fail as slowly; next pass
                log.warning("job %s: cannot be sent to the queue (%s: %s); the next pass retries", job_id,
                            type(e).__name__, e)
                break
        if sent:
            log.warning("sent %d queued job(s) with no message in the queue again: %s", len(sent), ", ".join(sent))
        return sent

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.reaper_interval):
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - keep reaping after a database hiccup
                log.exception("reaper pass failed")

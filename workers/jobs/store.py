"""The job store: every state change of a job is a conditional UPDATE, so API replicas, Celery
workers and the embedded pool can share it without locks.

Claiming: a worker runs a job only after ``claim`` moved it from ``queued`` to ``running``
(counting the attempt and taking a lease); a duplicate delivery of the same job finds it
claimed and does nothing. A running job's worker renews the lease (``heartbeat``); when a
worker dies its lease runs out and ``reap`` requeues the job, or fails it with
``worker_lost`` once ``max_attempts`` attempts were made. A graceful ``release`` gives the attempt
back: attempts count crashes, not restarts.

Dispatching: the store, not the broker, says which jobs wait. ``dispatched_at`` records when a
queued job was last handed to the queue (stamped before the message is sent, by a conditional
update, so of several senders only one sends); the reaper's sweep re-sends queued jobs whose
message is gone (``requeue_candidates``).
"""
from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, case, func, or_, select, text, true, update
from sqlalchemy.exc import IntegrityError

from workers.jobs.db import session_factory
from workers.jobs.models import FINISHED, Job, JobEvent, utcnow
from workers.redact import redact_obj, redact_text

DURATION_BUCKETS = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600)
HELD = ("running", "cancelling")  # statuses in which a worker holds the job


class IdempotencyConflict(Exception):
    def __init__(self, job: Job):
        super().__init__("idempotency key reused with a different body")
        self.job = job


@dataclass
class Reaped:
    job_id: str
    outcome: str  # "requeued" | "failed" | "cancelled"


class JobStore:
    def __init__(self, url: str):
        self.url = url
        self.Session = session_factory(url)

    # -- creation and reads ----------------------------------------------------------------------

    def create(self, *, tenant: str, method: str, spec: dict, requested_output: dict | None, max_attempts: int,
               idempotency_key: str | None = None, request_hash: str | None = None,
               job_id: str | None = None) -> tuple[Job, bool]:
        """Insert a queued job. With an idempotency key already used by this tenant, return the
        existing job (``created`` False) or raise ``IdempotencyConflict`` when the body differs."""
        if idempotency_key:
            existing = self._by_key(tenant, idempotency_key)
            if existing is not None:
                return self._replay(existing, request_hash), False
        now = utcnow()
        job = Job(id=job_id or str(uuid.uuid4()), tenant=tenant, status="queued", method=method, spec=spec,
                  requested_output=requested_output, idempotency_key=idempotency_key, request_hash=request_hash,
                  progress_done=0, progress_total=0, attempts=0, max_attempts=max_attempts,
                  created_at=now, updated_at=now)
        try:
            with self.Session.begin() as s:
                s.add(job)
                s.flush()
                s.add(JobEvent(job_id=job.id, at=now, type="queued", data={"method": method}))
        except IntegrityError:
            existing = self._by_key(tenant, idempotency_key) if idempotency_key else None
            if existing is None:
                raise
            return self._replay(existing, request_hash), False
        return job, True

    @staticmethod
    def _replay(existing: Job, request_hash: str | None) -> Job:
        if existing.request_hash != request_hash:
            raise IdempotencyConflict(existing)
        return existing

    def _by_key(self, tenant: str, key: str) -> Job | None:
        with self.Session() as s:
            return s.scalars(select(Job).where(Job.tenant == tenant, Job.idempotency_key == key)).first()

    def get(self, job_id: str, tenant: str | None = None) -> Job | None:
        with self.Session() as s:
            q = select(Job).where(Job.id == job_id)
            if tenant is not None:
                q = q.where(Job.tenant == tenant)
            return s.scalars(q).first()

    def list(self, tenant: str, status: str | None = None, limit: int = 50, before_seq: int | None = None) -> list[Job]:
        with self.Session() as s:
            q = select(Job).where(Job.tenant == tenant)
            if status:
                q = q.where(Job.status == status)
            if before_seq is not None:
                q = q.where(Job.seq < before_seq)
            return list(s.scalars(q.order_by(Job.seq.desc()).limit(limit)))

    def events(self, job_id: str) -> list[JobEvent]:
        with self.Session() as s:
            return list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))

    def add_event(self, job_id: str, type_: str, data: dict | None = None, at: dt.datetime | None = None) -> None:
        with self.Session.begin() as s:
            s.add(JobEvent(job_id=job_id, at=at or utcnow(), type=type_, data=redact_obj(data)))

    def add_events(self, job_id: str, events: list[tuple[dt.datetime, str, dict | None]]) -> None:
        if not events:
            return
        with self.Session.begin() as s:
            s.add_all(JobEvent(job_id=job_id, at=at, type=t, data=redact_obj(d)) for at, t, d in events)

    def queued_ids(self) -> list[str]:
        with self.Session() as s:
            return list(s.scalars(select(Job.id).where(Job.status == "queued").order_by(Job.seq)))

    # -- transitions -----------------------------------------------------------------------------

    def cancel(self, job_id: str, tenant: str) -> Job | None:
        """queued -> cancelled at once; running -> cancelling (the worker stops at its next check)."""
        now = utcnow()
        with self.Session.begin() as s:
            r = s.execute(update(Job).where(Job.id == job_id, Job.tenant == tenant, Job.status == "queued")
                          .values(status="cancelled", finished_at=now, updated_at=now, error_code="cancelled",
                                  error_message="cancelled before it started"))
            if r.rowcount:
                s.add(JobEvent(job_id=job_id, at=now, type="cancel_requested", data=None))
                s.add(JobEvent(job_id=job_id, at=now, type="finished", data={"status": "cancelled"}))
            else:
                r = s.execute(update(Job).where(Job.id == job_id, Job.tenant == tenant, Job.status == "running")
                              .values(status="cancelling", updated_at=now))
                if r.rowcount:
                    s.add(JobEvent(job_id=job_id, at=now, type="cancel_requested", data=None))
        return self.get(job_id, tenant)

    def claim(self, job_id: str, worker: str, lease_seconds: float) -> Job | None:
        """queued -> running for this worker, counting the attempt. None if someone else has it
        (or it is finished, or cancelled meanwhile)."""
        now = utcnow()
        with self.Session.begin() as s:
            r = s.execute(update(Job).where(Job.id == job_id, Job.status == "queued", Job.attempts < Job.max_attempts)
                          .values(status="running", attempts=Job.attempts + 1, worker=worker,
                                  lease_until=now + dt.timedelta(seconds=lease_seconds),
                                  started_at=func.coalesce(Job.started_at, now), updated_at=now,
                                  phase=None, progress_done=0, progress_total=0, phase_started_at=None))
            if not r.rowcount:
                return None
            job = s.scalars(select(Job).where(Job.id == job_id)).one()
            s.add(JobEvent(job_id=job_id, at=now, type="started", data={"attempt": job.attempts, "worker": worker}))
            return job

    def heartbeat(self, job_id: str, worker: str, lease_seconds: float, progress: dict | None = None) -> str | None:
        """Renew the lease (and store progress); return the job's status, or None when this
        worker no longer holds the job."""
        now = utcnow()
        values: dict[str, Any] = {"lease_until": now + dt.timedelta(seconds=lease_seconds)}
        if progress:
            values.update(progress)
            values["updated_at"] = now
        with self.Session.begin() as s:
            r = s.execute(update(Job).where(Job.id == job_id, Job.worker == worker,
                                            Job.status.in_(("running", "cancelling"))).values(**values))
            if not r.rowcount:
                return None
            return s.scalar(select(Job.status).where(Job.id == job_id))

    def status(self, job_id: str) -> str | None:
        with self.Session() as s:
            return s.scalar(select(Job.status).where(Job.id == job_id))

    def finish(self, job_id: str, worker: str, status: str, *, error: tuple[str, str] | None = None,
               result: dict | None = None, progress: dict | None = None) -> bool:
        now = utcnow()
        with self.Session.begin() as s:
            job = s.scalars(select(Job).where(Job.id == job_id)).first()
            if job is None or job.worker != worker or job.status not in ("running", "cancelling"):
                return False
            values: dict[str, Any] = {"status": status, "finished_at": now, "updated_at": now, "lease_until": None,
                                      "error_code": error[0] if error else None,
                                      "error_message": redact_text(error[1]) if error else None,
                                      "result": redact_obj(result),
                                      "duration_seconds": (now - job.started_at).total_seconds() if job.started_at else None}
            values.update(progress or {})
            r = s.execute(update(Job).where(Job.id == job_id, Job.worker == worker,
                                            Job.status.in_(("running", "cancelling"))).values(**values))
            if not r.rowcount:
                return False
            data = {"status": status}
            if error:
                data["error"] = {"code": error[0], "message": error[1]}
            s.add(JobEvent(job_id=job_id, at=now, type="finished", data=data))
            return True

    def release(self, job_id: str, worker: str, reason: str) -> bool:
        """Put a job this worker holds back in the queue (e.g. the worker is shutting down). The
        attempt is given back: ``max_attempts`` bounds attempts that crashed, and an interrupted one
        did not (three graceful restarts during one job must not use up its attempts)."""
        now = utcnow()
        with self.Session.begin() as s:
            r = s.execute(update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == "running")
                          .values(status="queued", worker=None, lease_until=None, updated_at=now, dispatched_at=None,
                                  attempts=Job.attempts - 1))
            if r.rowcount:
                s.add(JobEvent(job_id=job_id, at=now, type="retry", data={"reason": reason}))
            return bool(r.rowcount)

    def reap(self) -> list[Reaped]:
        """Jobs whose worker stopped renewing its lease: requeue, or fail with worker_lost after
        max_attempts, or (when a cancel was pending) cancel."""
        now = utcnow()
        with self.Session() as s:
            stale = list(s.scalars(select(Job).where(Job.status.in_(HELD), Job.lease_until < now)))
        return [r for job in stale if (r := self._lose(job, now, Job.lease_until < now, "stopped responding")) is not None]

    def reclaim(self, owner: str) -> list[Reaped]:
        """Jobs still held by workers named ``.../<owner>`` when the caller knows that owner is gone
        (an embedded server restarted on its data directory): settled as ``reap`` does, without
        waiting for their leases to run out."""
        now = utcnow()
        with self.Session() as s:
            held = list(s.scalars(select(Job).where(Job.status.in_(HELD),
                                                    Job.worker.endswith(f"/{owner}", autoescape=True))))
        return [r for job in held if (r := self._lose(job, now, true(), "died with its server")) is not None]

    def _lose(self, job: Job, now: dt.datetime, still, how: str) -> Reaped | None:
        """Settle a job whose worker is gone: cancelled when a cancel was pending, failed with
        worker_lost once max_attempts attempts started, else queued again (the lost attempt counts).
        The update is guarded by the status and worker that were read (and ``still``), so of
        several reapers only one settles it."""
        guard = and_(Job.id == job.id, Job.status == job.status, Job.worker == job.worker, still)
        lost = f"worker {job.worker} {how} during attempt {job.attempts} of {job.max_attempts}"
        with self.Session.begin() as s:
            if job.status == "cancelling":
                values = {"status": "cancelled", "error_code": "cancelled", "error_message": "cancelled", "finished_at": now}
                outcome, event = "cancelled", ("finished", {"status": "cancelled"})
            elif job.attempts >= job.max_attempts:
                msg = f"{lost}; giving up after {job.attempts} attempt(s)"
                values = {"status": "failed", "error_code": "worker_lost", "error_message": msg, "finished_at": now,
                          "duration_seconds": (now - job.started_at).total_seconds() if job.started_at else None}
                outcome, event = "failed", ("finished", {"status": "failed", "error": {"code": "worker_lost", "message": msg}})
            else:
                values = {"status": "queued", "worker": None, "dispatched_at": None}
                outcome, event = "requeued", ("retry", {"reason": "worker_lost", "message": lost, "attempt": job.attempts})
            r = s.execute(update(Job).where(guard).values(lease_until=None, updated_at=now, **values))
            if not r.rowcount:
                return None
            s.add(JobEvent(job_id=job.id, at=now, type=event[0], data=event[1]))
            return Reaped(job.id, outcome)

    # -- dispatch bookkeeping --------------------------------------------------------------------

    def mark_dispatched(self, job_id: str, expected: dt.datetime | None = None) -> dt.datetime | None:
        """Stamp a queued job as handed to the queue now, if its stamp is still ``expected`` (None:
        not dispatched). Returns the new stamp, or None when the job is no longer queued or another
        sender stamped it first (that one sends the message: one message per stamp)."""
        now = utcnow()
        same = Job.dispatched_at.is_(None) if expected is None else Job.dispatched_at == expected
        with self.Session.begin() as s:
            r = s.execute(update(Job).where(Job.id == job_id, Job.status == "queued", same).values(dispatched_at=now))
        return now if r.rowcount else None

    def unmark_dispatched(self, job_id: str, stamp: dt.datetime) -> None:
        """The message stamped ``stamp`` could not be sent: back to "not dispatched", so the next
        sweep retries it after the short grace instead of after ``requeue_after``."""
        with self.Session.begin() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.dispatched_at == stamp).values(dispatched_at=None))

    def requeue_candidates(self, requeue_after: float, grace: float,
                           limit: int = 2000) -> list[tuple[str, dt.datetime | None]]:
        """Queued jobs that may have no message: not dispatched for ``grace`` seconds since they
        became queued, or dispatched more than ``requeue_after`` seconds ago; (id, dispatched_at),
        oldest first, at most ``limit`` (as many as the sweep reads of the Celery queue: bounded work
        per pass, and newer jobs get their turn once older ones leave the queue)."""
        now = utcnow()
        with self.Session() as s:
            rows = s.execute(select(Job.id, Job.dispatched_at).where(
                Job.status == "queued",
                or_(and_(Job.dispatched_at.is_(None), Job.updated_at < now - dt.timedelta(seconds=grace)),
                    Job.dispatched_at < now - dt.timedelta(seconds=requeue_after))).order_by(Job.seq).limit(limit))
            return [(job_id, stamp) for job_id, stamp in rows]

    # -- metrics and health ----------------------------------------------------------------------

    def counts_by_status(self) -> dict[str, int]:
        with self.Session() as s:
            return {st: n for st, n in s.execute(select(Job.status, func.count()).group_by(Job.status))}

    def duration_histogram(self) -> tuple[list[tuple[float, int]], float, int]:
        cols = [func.sum(case((Job.duration_seconds <= b, 1), else_=0)) for b in DURATION_BUCKETS]
        with self.Session() as s:
            row = s.execute(select(*cols, func.coalesce(func.sum(Job.duration_seconds), 0.0), func.count())
                            .where(Job.status.in_(FINISHED), Job.duration_seconds.is_not(None))).one()
        buckets = [(float(b), int(n or 0)) for b, n in zip(DURATION_BUCKETS, row[:-2])]
        return buckets, float(row[-2] or 0.0), int(row[-1] or 0)

    def ping(self) -> None:
        with self.Session() as s:
            s.execute(text("SELECT 1"))

    def oldest_queued_age(self) -> float | None:
        with self.Session() as s:
            oldest = s.scalar(select(func.min(Job.created_at)).where(Job.status == "queued"))
        return (utcnow() - oldest).total_seconds() if oldest else None


__all__ = ["JobStore", "IdempotencyConflict", "Reaped"]

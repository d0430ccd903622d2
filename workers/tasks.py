"""The task: run one merge job from the job store. The ONE function both Celery and the embedded
pool call (``run_job``).

* claims the job in the store (counting the attempt; a duplicate delivery does nothing);
* validates the stored spec and checks its URIs again (``workers.policy.admit_spec``, the function
  the API admitted it with);
* removes whatever an interrupted earlier attempt left in the job's storage, so a retry starts clean;
* runs the job program (``workers.pipeline.run_pipeline``: calibration capture, ``merging.merge``
  with α search when asked, evaluation) with output at ``{storage}/{job_id}/model`` (staged and
  published atomically by merging's Publisher, so no half-written model is ever visible);
* a monitor thread renews the job's lease, writes phase/progress at most once per
  ``SUBMERGE_PROGRESS_INTERVAL`` and polls for cancellation, which ``should_cancel`` reports to merge();
* writes ``report.json`` and ``report.html`` (``workers.report``), records the result and fires the
  callback webhook.

``settle`` ends the jobs whose worker did not: the ones the reaper or a restarted embedded server
settled for a lost worker.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from merging.errors import CancelledError, MergeError
from workers.config import Settings, get_settings
from workers.jobs.models import utcnow
from workers.jobs.store import JobStore, Reaped
from workers.pipeline import run_pipeline
from workers.policy import PolicyError, admit_spec, job_io_config
from workers.redact import install_log_redaction, register_secret
from workers.report import write_reports
from workers.storage import Storage
from workers.webhooks import deliver_async

log = logging.getLogger("submerge.worker")


def worker_name(owner: str | None = None) -> str:
    """``host/pid/token``, plus ``/owner`` for an embedded server (workers.ownership), which lets a
    restarted server find the jobs it held when it died."""
    name = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
    return f"{name}/{owner}" if owner else name


class _Monitor(threading.Thread):
    """All store writes of a running job: lease, throttled progress, phase events; reads cancellation."""

    def __init__(self, store: JobStore, job_id: str, worker: str, settings: Settings):
        super().__init__(name=f"monitor-{job_id[:8]}", daemon=True)
        self.store, self.job_id, self.worker, self.settings = store, job_id, worker, settings
        self.cancel = threading.Event()   # a cancel was requested
        self.lost = threading.Event()     # this worker no longer holds the job
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._progress: dict | None = None
        self._written: dict | None = None
        self._events: list = []
        self._last_write = 0.0
        self._last_lease = time.monotonic()

    # called from the merge thread
    def report(self, phase: str, done: int, total: int) -> None:
        with self._lock:
            prev = self._progress
            now = utcnow()
            if prev is None or prev["phase"] != phase:
                self._events.append((now, "phase", {"phase": phase}))
                started = now
            else:
                started = prev["phase_started_at"]
            self._progress = {"phase": phase, "progress_done": done, "progress_total": total, "phase_started_at": started}

    def snapshot(self) -> dict | None:
        with self._lock:
            return dict(self._progress) if self._progress else None

    def flush_events(self) -> None:
        with self._lock:
            events, self._events = self._events, []
        if events:
            self.store.add_events(self.job_id, events)

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        snap = self.snapshot()
        write = snap is not None and snap != self._written and (force or now - self._last_write >= self.settings.progress_interval)
        renew = now - self._last_lease >= min(self.settings.lease_seconds / 4, 10.0)
        self.flush_events()
        if write or renew:
            status = self.store.heartbeat(self.job_id, self.worker, self.settings.lease_seconds, progress=snap if write else None)
            self._last_lease = now
            if write:
                self._last_write, self._written = now, snap
        else:
            status = self.store.status(self.job_id)
        if status is None or status not in ("running", "cancelling"):
            self.lost.set()
            self.cancel.set()
        elif status == "cancelling":
            self.cancel.set()

    def run(self) -> None:
        while not self._halt.wait(self.settings.cancel_poll_interval):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a database hiccup must not kill the job; the lease tells
                log.exception("job %s: monitor tick failed", self.job_id)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(timeout=10)


def run_job(job_id: str, settings: Settings | None = None, *, stop_event: threading.Event | None = None,
            owner: str | None = None) -> str:
    """Run one job end to end. Returns the outcome (a job status, or ``skipped`` when the job was
    not claimable, or ``released`` when ``stop_event`` interrupted it and it went back to the queue).
    ``owner``: the embedded server's identity, carried in the worker name."""
    settings = settings or get_settings()
    install_log_redaction()
    register_secret(settings.webhook_secret)
    store = JobStore(settings.db_url)
    worker = worker_name(owner)
    job = store.claim(job_id, worker, settings.lease_seconds)
    if job is None:
        log.info("job %s: not claimable (already taken, finished or cancelled)", job_id)
        return "skipped"
    log.info("job %s: attempt %d/%d on %s", job_id, job.attempts, job.max_attempts, worker)
    storage = Storage(settings)
    monitor = _Monitor(store, job_id, worker, settings)
    deadline = time.monotonic() + settings.job_soft_time_limit
    timed_out = threading.Event()

    def should_cancel() -> bool:
        if time.monotonic() > deadline:
            timed_out.set()
            return True
        return monitor.cancel.is_set() or (stop_event is not None and stop_event.is_set())

    def progress(ev) -> None:
        monitor.report(ev.phase, ev.done, ev.total)
        if settings.debug_step_delay and ev.phase == "merge":
            time.sleep(settings.debug_step_delay)

    outcome: tuple[str, tuple[str, str] | None, dict | None]
    t0 = time.perf_counter()
    monitor.start()
    try:
        spec = admit_spec(job.spec, settings)  # as at submission: the policy or the files may have changed
        storage.clear_job(job_id)  # leftovers of an interrupted attempt
        io = job_io_config(settings, storage)  # every file opened and every HTTP hop checked again
        run = run_pipeline(spec, progress=progress, io=io, should_cancel=should_cancel, cache_dir=io.cache_dir,
                           memory_budget=settings.memory_budget)
        result = run.merge
        artifacts = write_reports(storage, job, spec, run, t0)
        manifest = {k: v for k, v in result.manifest.items() if k != "tensors"}
        outcome = ("succeeded", None, {
            "model_uri": storage.model_uri(job_id), "report_uri": storage.uri(job_id, "report.json"),
            "requested_output": job.requested_output, "artifacts": artifacts, "manifest": manifest})
    except CancelledError:
        if timed_out.is_set():
            outcome = ("failed", ("time_limit", f"job exceeded its time limit of {settings.job_soft_time_limit} s"), None)
        elif monitor.lost.is_set():
            outcome = ("lost", None, None)
        elif stop_event is not None and stop_event.is_set() and not monitor.cancel.is_set():
            outcome = ("released", None, None)
        else:
            outcome = ("cancelled", ("cancelled", "cancelled on request"), None)
    except PolicyError as e:
        outcome = ("failed", (e.code, e.message), None)
    except MergeError as e:
        outcome = ("failed", (e.code, str(e)), None)
    except BaseException as e:  # noqa: BLE001 - Celery's SoftTimeLimitExceeded, bugs: never leave the job running
        if type(e).__name__ == "SoftTimeLimitExceeded":
            outcome = ("failed", ("time_limit", f"job exceeded its time limit of {settings.job_soft_time_limit} s"), None)
        elif isinstance(e, (KeyboardInterrupt, SystemExit)):
            monitor.stop()
            store.release(job_id, worker, f"worker interrupted ({type(e).__name__})")
            raise
        else:
            log.exception("job %s: unexpected error", job_id)
            outcome = ("failed", ("internal_error", f"{type(e).__name__}: {e}".splitlines()[0]), None)
    finally:
        monitor.stop()

    status, error, result_data = outcome
    try:
        monitor.flush_events()
    except Exception:  # noqa: BLE001
        log.exception("job %s: cannot record events", job_id)
    if status == "lost":
        log.warning("job %s: this worker lost the job (reaped or finished elsewhere); not recording", job_id)
        return status
    if status == "released":
        storage.clear_job(job_id)
        store.release(job_id, worker, "worker shutting down")
        return status
    if status != "succeeded":
        storage.clear_job(job_id)  # a failed or cancelled job keeps nothing
    snap = monitor.snapshot() or {}
    if status == "succeeded":
        snap.update(phase="done")
    if not store.finish(job_id, worker, status, error=error, result=result_data, progress=snap):
        log.warning("job %s: finished as %s but the store no longer lists this worker as its owner", job_id, status)
        return "lost"
    log.info("job %s: %s%s", job_id, status, f" ({error[0]}: {error[1]})" if error else "")
    deliver_async(job_id, settings, store)
    return status


def settle(reaped: list[Reaped], settings: Settings, store: JobStore) -> None:
    """After lost jobs were settled in the store (by the reaper, or by a restarted embedded server
    reclaiming them): a finished one (failed, cancelled) keeps nothing in storage (the lost attempt
    may have left files) and its webhook fires. Requeued ones are the caller's to send."""
    for r in reaped:
        if r.outcome == "requeued":
            continue
        try:
            Storage(settings).clear_job(r.job_id)
        except Exception:  # noqa: BLE001 - storage trouble must not stop the reaper
            log.exception("job %s: cannot remove what the lost attempt left", r.job_id)
        deliver_async(r.job_id, settings, store)

"""The job store on SQLite and PostgreSQL (127.0.0.1:5432, skipped only when unreachable):
alembic migrations, idempotent creation, exclusive claims, lease reaping with the attempt cap, the
attempt a graceful release gives back, dispatch stamps and the sweep's candidates, and the reclaim
of a dead embedded server's jobs."""
from __future__ import annotations

import datetime as dt
import threading

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import text, update

from workers.jobs.db import MIGRATIONS, get_engine, upgrade
from workers.jobs.models import Job, utcnow
from workers.jobs.store import IdempotencyConflict, JobStore
from tests.prom import sample
from tests.service_fixtures import *  # noqa: F401,F403
from tests.service_fixtures import job_spec, service_settings, write_family


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    return request.getfixturevalue("pg_database_url")


def _expire(store: JobStore, job_id: str) -> None:
    with store.Session.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(lease_until=utcnow() - dt.timedelta(seconds=1)))


def test_migrations_match_models_and_are_idempotent(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from workers.jobs.models import Base
    upgrade(db_url)
    upgrade(db_url)  # second run: nothing to do
    with get_engine(db_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], diff
        assert MigrationContext.configure(conn).get_current_revision() == "0002"


def test_migration_0002_keeps_queued_jobs_as_not_dispatched(db_url):
    cfg = Config()
    cfg.set_main_option("script_location", MIGRATIONS)
    with get_engine(db_url).connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(text("INSERT INTO jobs (id, tenant, status, method, spec, progress_done, progress_total, attempts, "
                          "max_attempts, created_at, updated_at) VALUES ('j1', 't', 'queued', 'm', '{}', 0, 0, 0, 3, "
                          "'2025-01-01 00:00:00', '2025-01-01 00:00:00')"))
        conn.commit()
    upgrade(db_url)
    store = JobStore(db_url)
    job = store.get("j1")
    assert job.status == "queued" and job.dispatched_at is None
    assert store.requeue_candidates(30, 5) == [("j1", None)]  # the sweep sends it


def test_idempotent_create_claim_heartbeat_finish(db_url):
    upgrade(db_url)
    store = JobStore(db_url)
    j, created = store.create(tenant="t", method="m", spec={"a": 1}, requested_output=None, max_attempts=2,
                              idempotency_key="k", request_hash="h1")
    assert created
    again, created = store.create(tenant="t", method="m", spec={"a": 1}, requested_output=None, max_attempts=2,
                                  idempotency_key="k", request_hash="h1")
    assert not created and again.id == j.id
    with pytest.raises(IdempotencyConflict):
        store.create(tenant="t", method="m", spec={}, requested_output=None, max_attempts=2, idempotency_key="k", request_hash="h2")
    other, created = store.create(tenant="u", method="m", spec={}, requested_output=None, max_attempts=2,
                                  idempotency_key="k", request_hash="h2")
    assert created and other.id != j.id

    # many workers race for one job: exactly one claims it
    wins = []
    barrier = threading.Barrier(6)

    def claim(i):
        barrier.wait()
        if store.claim(j.id, f"w{i}", 30):
            wins.append(i)
    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(wins) == 1
    w = f"w{wins[0]}"
    assert store.heartbeat(j.id, w, 30, progress={"phase": "merge", "progress_done": 3, "progress_total": 9,
                                                   "phase_started_at": utcnow()}) == "running"
    assert store.heartbeat(j.id, "someone-else", 30) is None
    assert store.get(j.id).progress_done == 3
    assert store.cancel(j.id, "t").status == "cancelling"
    assert store.heartbeat(j.id, w, 30) == "cancelling"
    assert store.finish(j.id, w, "cancelled", error=("cancelled", "x"))
    assert not store.finish(j.id, w, "succeeded")
    assert store.get(j.id).status == "cancelled"
    assert store.get(j.id, tenant="u") is None
    assert [e.type for e in store.events(j.id)] == ["queued", "started", "cancel_requested", "finished"]


def test_reap_requeues_then_fails_worker_lost(db_url):
    upgrade(db_url)
    store = JobStore(db_url)
    j, _ = store.create(tenant="t", method="m", spec={}, requested_output=None, max_attempts=2)
    assert store.claim(j.id, "w1", 30)
    assert store.reap() == []  # lease still valid
    _expire(store, j.id)
    [r] = store.reap()
    assert (r.job_id, r.outcome) == (j.id, "requeued")
    job = store.get(j.id)
    assert job.status == "queued" and job.attempts == 1 and job.worker is None
    assert store.heartbeat(j.id, "w1", 30) is None  # the dead worker, if it comes back, has lost the job
    assert store.claim(j.id, "w2", 30).attempts == 2
    _expire(store, j.id)
    [r] = store.reap()
    assert r.outcome == "failed"
    job = store.get(j.id)
    assert job.status == "failed" and job.error_code == "worker_lost" and job.attempts == 2
    assert store.claim(j.id, "w3", 30) is None
    assert [e.type for e in store.events(j.id)] == ["queued", "started", "retry", "started", "finished"]
    counts = store.counts_by_status()
    assert counts == {"failed": 1}
    buckets, total, n = store.duration_histogram()
    assert n == 1 and buckets[-1][1] == 1


def _age(store: JobStore, job_id: str, **seconds_ago: float) -> None:
    with store.Session.begin() as s:
        s.execute(update(Job).where(Job.id == job_id).values(
            **{col: utcnow() - dt.timedelta(seconds=ago) for col, ago in seconds_ago.items()}))


def test_release_gives_the_attempt_back(db_url):
    upgrade(db_url)
    store = JobStore(db_url)
    j, _ = store.create(tenant="t", method="m", spec={}, requested_output=None, max_attempts=2)
    for i in range(3):  # more graceful stops than max_attempts: the job stays claimable
        assert store.mark_dispatched(j.id)
        assert store.claim(j.id, f"w{i}", 30).attempts == 1
        assert store.release(j.id, f"w{i}", "worker shutting down")
        job = store.get(j.id)
        assert (job.status, job.attempts, job.worker, job.dispatched_at) == ("queued", 0, None, None)
    assert not store.release(j.id, "w0", "again")  # only the holder releases, once
    assert store.claim(j.id, "w9", 30).attempts == 1
    _expire(store, j.id)
    [r] = store.reap()  # a crash still counts
    assert r.outcome == "requeued" and store.get(j.id).attempts == 1
    assert [e.type for e in store.events(j.id)].count("retry") == 4


def test_dispatch_stamp_and_requeue_candidates(db_url):
    upgrade(db_url)
    store = JobStore(db_url)
    a, _ = store.create(tenant="t", method="m", spec={}, requested_output=None, max_attempts=2)
    b, _ = store.create(tenant="t", method="m", spec={}, requested_output=None, max_attempts=2)
    assert store.requeue_candidates(30, 5) == []  # just queued: left to whoever queues them
    _age(store, a.id, updated_at=10)
    assert store.requeue_candidates(30, 5) == [(a.id, None)]  # never dispatched, grace over
    stamp = store.mark_dispatched(a.id)
    assert stamp is not None and store.mark_dispatched(a.id) is None  # a second sender loses
    assert store.requeue_candidates(30, 5) == []  # dispatched recently
    _age(store, a.id, dispatched_at=60)
    [(job_id, old)] = store.requeue_candidates(30, 5)
    assert job_id == a.id and old < stamp
    assert store.mark_dispatched(a.id, expected=stamp) is None  # stale expectation
    again = store.mark_dispatched(a.id, expected=old)
    assert again is not None and store.mark_dispatched(a.id, expected=old) is None
    store.unmark_dispatched(a.id, stamp)  # not its stamp any more: no effect
    assert store.get(a.id).dispatched_at == again
    store.unmark_dispatched(a.id, again)  # the send failed
    assert store.get(a.id).dispatched_at is None
    assert store.claim(b.id, "w", 30) and store.mark_dispatched(b.id) is None  # only queued jobs
    _age(store, b.id, updated_at=10)
    assert [c[0] for c in store.requeue_candidates(30, 5)] == [a.id]
    _expire(store, b.id)
    assert store.reap()[0].outcome == "requeued" and store.get(b.id).dispatched_at is None


def test_reclaim_settles_a_dead_owners_jobs_at_once(db_url):
    upgrade(db_url)
    store = JobStore(db_url)

    def held(worker, attempts=1, cancel=False):
        j, _ = store.create(tenant="t", method="m", spec={}, requested_output=None, max_attempts=2)
        for i in range(attempts):
            if i:
                _expire(store, j.id)
                store.reap()
            store.claim(j.id, worker, 300)  # a long lease: reclaim does not wait for it
        if cancel:
            store.cancel(j.id, "t")
        return j.id

    mine = "host/1/aaaa/embedded-abc"
    retry, lost, cancelled = held(mine), held(mine.replace("aaaa", "bbbb"), attempts=2), held(mine, cancel=True)
    others = [held("host/1/cccc/embedded-abcd"), held("host/1/dddd"), held("host/1/eeee/embedded-xyz")]
    got = {r.job_id: r.outcome for r in store.reclaim("embedded-abc")}
    assert got == {retry: "requeued", lost: "failed", cancelled: "cancelled"}
    job = store.get(retry)
    assert (job.status, job.attempts, job.worker, job.dispatched_at) == ("queued", 1, None, None)
    assert store.events(retry)[-1].data["reason"] == "worker_lost"
    job = store.get(lost)
    assert job.status == "failed" and job.error_code == "worker_lost" and "after 2 attempt(s)" in job.error_message
    assert store.get(cancelled).status == "cancelled"
    assert [store.get(o).status for o in others] == ["running"] * 3
    assert store.reclaim("embedded-abc") == []


def test_list_pagination(db_url):
    upgrade(db_url)
    store = JobStore(db_url)
    ids = [store.create(tenant="t", method="m", spec={}, requested_output=None, max_attempts=1)[0].id for _ in range(5)]
    store.create(tenant="other", method="m", spec={}, requested_output=None, max_attempts=1)
    page1 = store.list("t", limit=3)
    page2 = store.list("t", limit=3, before_seq=page1[-1].seq)
    assert [j.id for j in page1 + page2] == list(reversed(ids))
    assert store.list("t", status="succeeded") == []


def test_api_end_to_end_on_postgresql(api, pg_database_url, checkpoints, tmp_path):
    srv = api(service_settings(tmp_path, database_url=pg_database_url))
    base, experts = write_family(checkpoints)
    with srv.client() as c:
        job = srv.wait(c, c.post("/v1/merges", json=job_spec(base, experts), headers={"Idempotency-Key": "pg"}).json()["id"])
        assert job["status"] == "succeeded"
        assert c.post("/v1/merges", json=job_spec(base, experts), headers={"Idempotency-Key": "pg"}).json()["id"] == job["id"]
        assert c.get("/readyz").json()["checks"]["database"] == {"ok": True}
        assert sample(c.get("/metrics").text, "submerge_jobs", status="succeeded") == 1

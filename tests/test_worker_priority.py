"""Merge work runs at a lower CPU priority than the API (SUBMERGE_WORKER_NICE): the embedded
pool's threads only, not the API's, and (tests/test_service_celery.py) the Celery worker process."""
from __future__ import annotations

import os
import threading
import time

import pytest

from tests.service_fixtures import api, service_settings  # noqa: F401

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads thread priorities from Linux /proc")


def task_nice(tid: int) -> int:
    """The nice value of one thread of this process (field 19 of /proc/self/task/<tid>/stat)."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[16])


def test_lower_thread_priority_lowers_only_the_calling_thread():
    from workers.priority import lower_thread_priority
    me = task_nice(threading.get_native_id())
    seen = {}

    def work():
        seen["returned"] = lower_thread_priority(3)
        seen["nice"] = task_nice(threading.get_native_id())
    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen["nice"] == seen["returned"] == min(19, me + 3)
    assert task_nice(threading.get_native_id()) == me
    assert lower_thread_priority(0) is None


def test_embedded_pool_threads_run_below_the_api(api, tmp_path):  # noqa: F811
    me = task_nice(threading.get_native_id())
    srv = api(service_settings(tmp_path, worker_nice=6, worker_concurrency=2))
    deadline = time.monotonic() + 10
    while True:
        pool = [t for t in threading.enumerate() if t.name.startswith("submerge-worker-")]
        if len(pool) == 2 and all(task_nice(t.native_id) == min(19, me + 6) for t in pool):
            break
        assert time.monotonic() < deadline, [(t.name, task_nice(t.native_id)) for t in pool]
        time.sleep(0.05)
    # the API's own threads keep their priority
    assert task_nice(srv.thread.native_id) == me and task_nice(threading.get_native_id()) == me

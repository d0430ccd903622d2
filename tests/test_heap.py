"""merging.heap: freed large arrays go back to the system while a memory-heavy merge runs."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

from merging import heap

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"),
                           reason="glibc's allocator only")

# Free a 20 MB mapped block (glibc then raises its heap threshold to 20 MB), allocate 20 arrays of
# 12 MB, free all but the last: on the heap, the freed 228 MB stay below the live top array.
_SCRIPT = textwrap.dedent("""
    import sys, torch
    from merging import heap
    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 >> 20
    def retained():
        big = torch.ones(20 << 18); del big
        before = rss_mb()
        arrays = [torch.ones(3 << 20) for _ in range(20)]
        last = arrays[-1]; del arrays
        return rss_mb() - before
    with heap.unmap_freed_arrays(sys.argv[1] == "on"):
        print(retained(), heap.active())
    print(retained(), heap.active())
""")


def _run(script: str, *args: str) -> list[tuple[int, bool]]:
    """Run ``script`` in a fresh interpreter (glibc's thresholds are process-wide); its lines are
    ``<count> <heap.active()>``."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout.split("\n")
    return [(int(a), b == "True") for a, b in (line.split() for line in out if line)]


@glibc
def test_freed_arrays_are_given_back_only_inside_the_context():
    (off_inside, off_active), (off_after, _) = _run(_SCRIPT, "off")
    (on_inside, on_active), (on_after, on_active_after) = _run(_SCRIPT, "on")
    assert off_inside > 150 and not off_active  # glibc's heap keeps the freed arrays (the premise)
    assert on_inside < 40 and on_active
    # After the context, the threshold is glibc's ceiling (32 MB): 12 MB arrays are heap-allocated again.
    assert on_after > 150 and not on_active_after


def test_an_owner_set_threshold_is_left_alone(monkeypatch):
    monkeypatch.setattr(heap, "_looked_up", False)
    monkeypatch.setattr(heap, "_mallopt", None)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    with heap.unmap_freed_arrays(True):
        assert not heap.active()


# Allocate and free a 768 x 768 float64 array (4.7 MB, ESM's most frequent work array) 100 times
# and count the minor page faults: a fresh mapping faults in every page (1152) each time.
_FAULTS = textwrap.dedent("""
    import resource, torch
    from merging import heap
    def faults():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(100):
            a = torch.ones(768, 768, dtype=torch.float64); del a
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    with heap.unmap_freed_arrays(True):
        print(faults(), heap.active())
""")


@glibc
def test_small_work_arrays_are_reused_from_the_heap_while_active():
    """Only arrays of 8 MB or more get their own mapping: with every array of 1 MB or more mapped,
    the page faults and unmaps of the 4.7 MB ones cost ESM 48 s of system time in a 162 s merge
    (27 s at 8 MB), and two worker threads unmapping in one process slow each other down."""
    [(faults, active)] = _run(_FAULTS)
    assert active
    assert faults < 100 * 1152 // 10, faults  # the heap's pages are faulted in once, not every time

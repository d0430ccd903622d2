"""Give freed work arrays back to the system while a memory-heavy merge runs (glibc only).

glibc serves an allocation from its heap when the allocation is below a threshold that starts at
128 KB and rises, each time a larger mapped block is freed, up to 32 MB. Heap memory goes back
to the system only from the top of the heap, and every thread allocates from its own heap
(arena). A merge that allocates and frees many 1–75 MB float64 work arrays from two worker
threads therefore holds much more memory than it uses: ESM on the 12-block ViT-B/16 benchmark
peaked at 1.50–1.57 GB of RSS with two workers (glibc's own threshold, or 32 MB). So while such
a merge runs, every array of 8 MB or more is mapped on its own and unmapped when freed (1.32–1.34
GB), and up to 16 MB may stay free at a heap's top instead of going back at once.

Smaller arrays stay on the heap, where freed memory is reused without a page fault. An earlier
1 MB threshold gave 1.11–1.14 GB, but then ESM's most frequent work arrays (768 × 768 float64,
4.7 MB) were fresh mappings each time: every page faulted in and zeroed, every free an unmap
that interrupts the other worker thread of the process (a TLB shootdown): 39–48 s of system
time in a 148–171 s merge, against 27–35 s at 8 MB, and 3–10 % less wall time in three of four
alternating pairs (bench/RESULTS.md, 2026-11-23 at a7e9f97 and 35d702e). Mapping costs the short-job methods (TSV-M,
Iso-C) 5–10 % of their time in page faults for memory they do not need, so only methods that
ask for it get it (``MergeMethod.unmap_freed_arrays``).

The thresholds are process-wide. While any such merge runs they are 8 MB (mapping) and 16 MB
(trim); when the last one ends the mapping threshold is set to 32 MB, the ceiling of glibc's
own rising threshold (which, once set by hand, does not rise again), and the trim threshold to
twice that. A process started with ``MALLOC_MMAP_THRESHOLD_`` in its environment keeps what its
owner chose. Elsewhere than glibc this is a no-op.
"""
from __future__ import annotations

import ctypes
import os
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
WHILE_ACTIVE = 8 << 20
AFTER = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems

_lock = threading.Lock()
_active: list[int] = []  # the mapping threshold each running merge asked for; the smallest applies
_mallopt = None
_looked_up = False


def _get_mallopt():
    global _mallopt, _looked_up
    if not _looked_up:
        _looked_up = True
        if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            try:
                libc = ctypes.CDLL(None)
                if hasattr(libc, "gnu_get_libc_version"):  # glibc: musl's mallopt does nothing
                    _mallopt = libc.mallopt
                    _mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                    _mallopt.restype = ctypes.c_int
            except (OSError, AttributeError):
                _mallopt = None
    return _mallopt


def active() -> bool:
    """Whether a merge inside ``unmap_freed_arrays(True)`` is running in this process."""
    return bool(_active)


@contextmanager
def unmap_freed_arrays(enabled: bool = True, threshold: int = WHILE_ACTIVE) -> Iterator[None]:
    """Map every allocation of ``threshold`` bytes or more on its own for the duration (see the
    module docstring). A merge in row blocks passes the size of its block arrays when they are
    smaller than 8 MB: under a small budget, each thread's heap would otherwise keep its high
    water of them (1.8-2.4 times a 64 MiB budget, measured; 1.1-1.2 times mapped)."""
    mallopt = _get_mallopt() if enabled else None
    if mallopt is None:
        yield
        return
    threshold = max(1 << 20, min(threshold, WHILE_ACTIVE))
    with _lock:
        _active.append(threshold)
        _apply(mallopt)
    try:
        yield
    finally:
        with _lock:
            _active.remove(threshold)
            _apply(mallopt)


def _apply(mallopt) -> None:
    """Set glibc's thresholds for the merges running now (called with the lock held)."""
    if _active:
        mallopt(_M_MMAP_THRESHOLD, min(_active))
        # keep up to this much free at a heap's top, so that the next small array reuses it
        mallopt(_M_TRIM_THRESHOLD, 2 * min(_active))
    else:
        mallopt(_M_MMAP_THRESHOLD, AFTER)
        mallopt(_M_TRIM_THRESHOLD, 2 * AFTER)  # glibc's own rule: twice the mapping threshold

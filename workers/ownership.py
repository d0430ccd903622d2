"""Who owns the jobs an embedded server runs, and whether that owner can still be alive.

An embedded server (``submerge serve`` without Redis) names its workers ``host/pid/token/<owner>``,
where ``<owner>`` is ``embedded-<id>`` and ``<id>`` is random, made once per data directory and kept
in ``<data_dir>/embedded.lock``. Every embedded server holds a shared ``flock`` on that file while it
runs. One that gets the *exclusive* lock at start knows that no other live server uses the data
directory, so any job still running under ``<owner>`` belonged to a process that is gone: it can be
requeued at once instead of waiting out its lease. Process ids prove nothing here (in a container
the server is always pid 1); the kernel drops a dead process's lock, whatever its pid.

A random id rather than the directory's path: two containers may both call their volume ``/data``
and share one PostgreSQL job store; each must reclaim only its own jobs.
"""
from __future__ import annotations

import fcntl
import os
import uuid

LOCK_NAME = "embedded.lock"


class EmbeddedOwnership:
    def __init__(self, data_dir: str):
        self.path = os.path.join(data_dir, LOCK_NAME)
        self.owner: str | None = None
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take part in the data directory; True when no other live embedded server uses it. Then
        the exclusive lock is held until ``share()``, so that a server starting meanwhile waits
        until this one has reclaimed the dead owner's jobs (before it runs any itself)."""
        self._create()
        fd = os.open(self.path, os.O_RDONLY)  # not inherited by child processes (PEP 446)
        try:
            self.owner = "embedded-" + os.read(fd, 64).decode().strip()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                alone = True
            except BlockingIOError:
                fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a starting server holds the exclusive lock
                alone = False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return alone

    def share(self) -> None:
        """Downgrade to the shared lock held while this server runs (others may now start)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_SH)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the lock
            self._fd = None

    def _create(self) -> None:
        """Write the id once: into a temporary file linked into place, so a server starting at the
        same moment reads either no file (and links its own, losing the race) or a complete one."""
        if os.path.exists(self.path):
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{uuid.uuid4().hex}"
        with open(tmp, "w") as f:
            f.write(uuid.uuid4().hex[:16] + "\n")
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)

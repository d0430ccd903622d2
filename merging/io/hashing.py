"""SHA-256 of checkpoint files, remembered per file version in memory and on disk.

A merge records the sha256 of every input file (merge.json, the model card) and the evaluation
caches are keyed by them. Hashing is a core's work for every byte (0.8 s per GB here): 2.5 s of
a 12-block ViT-B/16 merge with 8 experts, a minute for a set of 7B experts. Users merge the same
experts again and again (one method after another, α sweeps), so a digest is kept:

* in memory for this process, and
* on disk under ``<cache_dir>/sha256/`` (``SUBMERGE_CACHE_DIR``, else ``~/.cache/submerge``), for
  the next process (the next job, the next CLI run).

Both are keyed by the file's identity and version: real path, device, inode, size, and the
modification and change times in nanoseconds. Every write to a file sets its change time to now,
and no system call sets it back (``touch`` and ``os.utime`` reset only the modification time), so
a remembered digest is never one of older content. A cache directory that cannot be written
only costs the saving.
"""
from __future__ import annotations

import hashlib
import os
import threading

from merging.io.sources import default_cache_dir

_MEMO: dict[tuple, str] = {}
_LOCK = threading.Lock()
_HEX = frozenset("0123456789abcdef")


def sha256_file(path: str, cache_dir: str | None = None, persist: bool = True) -> str:
    """The hex SHA-256 of the bytes of the local file ``path``.

    ``cache_dir`` holds the on-disk store (default: the I/O cache directory); ``persist=False``
    skips the disk for files that will not be asked about by another process (staged outputs).
    """
    st = os.stat(path)
    version = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _LOCK:
        hit = _MEMO.get(version)
    if hit is not None:
        return hit
    entry = _entry_path(version, cache_dir) if persist else None
    digest = _read_entry(entry) if entry else None
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        digest = h.hexdigest()
        if entry:
            _write_entry(entry, digest)
    with _LOCK:
        _MEMO[version] = digest
    return digest


def _entry_path(version: tuple, cache_dir: str | None) -> str:
    name = hashlib.sha256(repr(version).encode()).hexdigest()
    return os.path.join(cache_dir or default_cache_dir(), "sha256", name[:2], name)


def _read_entry(entry: str) -> str | None:
    try:
        with open(entry) as f:
            digest = f.read(65).strip()
    except (OSError, UnicodeDecodeError):
        return None
    return digest if len(digest) == 64 and set(digest) <= _HEX else None  # a damaged entry is a miss


def _write_entry(entry: str, digest: str) -> None:
    tmp = f"{entry}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        os.makedirs(os.path.dirname(entry), exist_ok=True)
        with open(tmp, "w") as f:
            f.write(digest + "\n")
        os.replace(tmp, entry)  # readers see the whole entry or none
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass

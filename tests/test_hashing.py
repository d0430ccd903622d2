"""Input digests: remembered per file version, in this process and on disk for the next one."""
import hashlib
import os

import pytest

from merging.io import hashing


@pytest.fixture
def counted_reads(monkeypatch):
    """Paths hashing.py opened for reading file content (cache entries excluded)."""
    import builtins
    reads = []
    real_open = builtins.open

    def counting_open(path, mode="r", *a, **kw):
        if "b" in mode:
            reads.append(str(path))
        return real_open(path, mode, *a, **kw)
    monkeypatch.setattr(hashing, "open", counting_open, raising=False)
    monkeypatch.setattr(hashing, "_MEMO", {})
    return reads


def _new_process(monkeypatch):
    monkeypatch.setattr(hashing, "_MEMO", {})  # what a new process starts with


def test_a_file_is_read_once_per_version(tmp_path, counted_reads):
    p = tmp_path / "w.bin"
    p.write_bytes(b"x" * 1000)
    first = hashing.sha256_file(str(p), str(tmp_path / "cache"))
    assert first == hashlib.sha256(b"x" * 1000).hexdigest()
    assert hashing.sha256_file(str(p), str(tmp_path / "cache")) == first and len(counted_reads) == 1


def test_the_next_process_gets_the_digest_from_disk(tmp_path, counted_reads, monkeypatch):
    p = tmp_path / "w.bin"
    p.write_bytes(b"x" * 1000)
    cache = str(tmp_path / "cache")
    first = hashing.sha256_file(str(p), cache)
    _new_process(monkeypatch)
    assert hashing.sha256_file(str(p), cache) == first and len(counted_reads) == 1
    _new_process(monkeypatch)  # another cache directory knows nothing
    assert hashing.sha256_file(str(p), str(tmp_path / "other")) == first and len(counted_reads) == 2


def test_rewritten_content_is_hashed_again_even_with_its_old_mtime(tmp_path, counted_reads, monkeypatch):
    p = tmp_path / "w.bin"
    p.write_bytes(b"x" * 1000)
    cache = str(tmp_path / "cache")
    hashing.sha256_file(str(p), cache)
    st = p.stat()
    p.write_bytes(b"y" * 1000)  # same size; then the old mtime is put back: only the ctime tells
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert p.stat().st_mtime_ns == st.st_mtime_ns and p.stat().st_size == st.st_size
    for _ in range(2):  # neither the memory nor the disk entry of the old version answers
        assert hashing.sha256_file(str(p), cache) == hashlib.sha256(b"y" * 1000).hexdigest()
        _new_process(monkeypatch)
    assert len(counted_reads) == 2  # old version, new version; the new one's entry served the second ask


def test_a_damaged_entry_is_a_miss_and_is_replaced(tmp_path, counted_reads, monkeypatch):
    p = tmp_path / "w.bin"
    p.write_bytes(b"x" * 1000)
    cache = tmp_path / "cache"
    hashing.sha256_file(str(p), str(cache))
    (entry,) = [e for e in (cache / "sha256").rglob("*") if e.is_file()]
    entry.write_text("0" * 63 + "g")  # not a digest: must not be trusted
    _new_process(monkeypatch)
    assert hashing.sha256_file(str(p), str(cache)) == hashlib.sha256(b"x" * 1000).hexdigest()
    assert len(counted_reads) == 2 and entry.read_text().strip() == hashlib.sha256(b"x" * 1000).hexdigest()


def test_an_unwritable_cache_only_costs_the_saving(tmp_path, counted_reads, monkeypatch):
    p = tmp_path / "w.bin"
    p.write_bytes(b"x" * 1000)
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be")
    assert hashing.sha256_file(str(p), str(blocker)) == hashlib.sha256(b"x" * 1000).hexdigest()
    _new_process(monkeypatch)
    assert hashing.sha256_file(str(p), str(blocker)) == hashlib.sha256(b"x" * 1000).hexdigest()
    assert len(counted_reads) == 2 and blocker.is_file()


def test_persist_false_writes_nothing(tmp_path, counted_reads):
    p = tmp_path / "w.bin"
    p.write_bytes(b"x" * 10)
    hashing.sha256_file(str(p), str(tmp_path / "cache"), persist=False)
    assert not (tmp_path / "cache").exists()

"""Checkpoint sources by URI, through fsspec.

Accepted: plain local paths, ``file://``, ``s3://`` (any S3-compatible endpoint), ``http(s)://``
and ``hf://[datasets/]org/repo[@revision][/path]``.

Remote files are validated from their first bytes with ranged reads (``read_range``), then
downloaded once into a local cache (keyed by URI, size and ETag / Last-Modified) and read from
there; local files are read in place. A download happens at most once per file and cache, also
when several threads (or processes sharing the cache) ask for it at the same time.
"""
from __future__ import annotations

import copy
import fcntl
import hashlib
import os
import posixpath
import shutil
import tempfile
import threading
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from merging.errors import AccessDeniedError, UnreadableURIError
from merging.io.guard import InputGuard, checked_local_path, guarded_http_client

REMOTE_SCHEMES = ("s3", "http", "https", "hf")
WRITABLE_SCHEMES = ("", "file", "s3")
HTTP_SCHEMES = ("http", "https")
_HF_REPO_TYPES = ("datasets", "spaces", "models")


def default_cache_dir() -> str:
    return os.environ.get("SUBMERGE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "submerge")


def env_s3_endpoint() -> str | None:
    return os.environ.get("SUBMERGE_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None


def default_storage_options() -> dict[str, dict[str, Any]]:
    """Per-protocol fsspec options from the environment (S3 endpoint for MinIO and friends)."""
    endpoint = env_s3_endpoint()
    return {"s3": {"endpoint_url": endpoint} if endpoint else {}}


@dataclass
class IOConfig:
    """Where and how to read and write.

    ``storage_options`` maps a scheme (``s3``, ``http``, ``https``, ``hf``) to fsspec options for
    it, e.g. ``{"s3": {"endpoint_url": "http://127.0.0.1:9000", "key": ..., "secret": ...}}``.
    When no S3 endpoint is given there, ``SUBMERGE_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL`` is used.

    ``guard`` (``merging.io.guard.InputGuard``) is asked before every local file is opened and
    before every http(s) request, redirect hop and connection; None reads anything.
    """

    storage_options: dict[str, dict[str, Any]] = field(default_factory=default_storage_options)
    cache_dir: str = field(default_factory=default_cache_dir)
    guard: InputGuard | None = None


def split_scheme(uri: str) -> tuple[str, str]:
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return scheme.lower(), rest
    return "", uri


def storage_options_for(scheme: str, cfg: IOConfig) -> dict[str, Any]:
    """fsspec options for one scheme: the configured ones, with the S3 endpoint normalised."""
    opts = copy.deepcopy(dict((cfg.storage_options or {}).get(scheme) or {}))
    if scheme == "https" and not opts:
        opts = copy.deepcopy(dict((cfg.storage_options or {}).get("http") or {}))
    if scheme == "s3":
        client_kwargs = dict(opts.get("client_kwargs") or {})
        endpoint = opts.get("endpoint_url") or client_kwargs.pop("endpoint_url", None) or env_s3_endpoint()
        if endpoint:
            opts["endpoint_url"] = endpoint  # s3fs: takes precedence over client_kwargs
        if client_kwargs:
            opts["client_kwargs"] = client_kwargs
        else:
            opts.pop("client_kwargs", None)
        # A long-lived worker must not trust listings cached by an earlier job.
        opts.setdefault("use_listings_cache", False)
    return opts


def hf_path(rest: str, revision: str | None) -> str:
    """The HfFileSystem path for ``hf://<rest>``, with ``revision`` spliced in as ``repo@revision``.

    ``rest`` is ``[datasets/|spaces/]org/repo[@rev][/path]``. A revision in the URI and a different
    ``revision`` argument conflict; revisions holding ``/`` (``refs/pr/1``) are percent-encoded,
    as HfFileSystem expects.
    """
    parts = [p for p in rest.split("/")]
    prefix: list[str] = []
    if parts and parts[0] in _HF_REPO_TYPES:
        prefix, parts = parts[:1], parts[1:]
    if not parts or not parts[0]:
        raise UnreadableURIError(f"hf://{rest}: not a Hugging Face repo (use hf://org/repo[@revision][/path])")
    # org/repo, or a legacy single-name repo when the URI has one component
    repo_idx = 1 if len(parts) >= 2 else 0
    repo = parts[repo_idx]
    if "@" in repo:
        name, in_uri = repo.split("@", 1)
        if revision and urllib.parse.unquote(in_uri) != revision:
            raise UnreadableURIError(f"hf://{rest}: revision {revision!r} conflicts with @{in_uri} in the URI")
        return "/".join(prefix + parts)
    if revision:
        parts[repo_idx] = f"{repo}@{urllib.parse.quote(revision, safe='')}"
    return "/".join(prefix + parts)


def _fs_for(uri: str, cfg: IOConfig, revision: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    scheme, rest = split_scheme(uri)
    if scheme in ("", "file"):
        return LocalFileSystem(), os.path.abspath(os.path.expanduser(rest))
    if scheme not in REMOTE_SCHEMES:
        raise UnreadableURIError(f"unsupported URI scheme {scheme!r} in {uri} (use a path, file://, s3://, http(s):// or hf://)")
    opts = storage_options_for(scheme, cfg)
    if scheme in HTTP_SCHEMES and cfg.guard is not None:
        opts["get_client"] = guarded_http_client(cfg.guard)
        opts["skip_instance_cache"] = True  # a guarded session belongs to its job, not to fsspec's cache
    if scheme == "hf":
        path = hf_path(rest.strip("/"), revision)
    elif scheme in HTTP_SCHEMES:
        path = uri
    else:
        path = rest.rstrip("/")
        if not path or path.startswith("/"):
            raise UnreadableURIError(f"{uri}: not an s3://bucket/key URI")
    try:
        fs = fsspec.filesystem(scheme, **opts)
    except ImportError as e:
        raise UnreadableURIError(f"{uri}: support for {scheme}:// is not installed ({e})") from None
    except Exception as e:
        raise UnreadableURIError(f"{uri}: cannot set up {scheme}:// access ({e.__class__.__name__}: {_first_line(e)})") from None
    return fs, path


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else ""


def _access_denied(e: BaseException | None) -> AccessDeniedError | None:
    """The guard's refusal inside an exception chain (fsspec and aiohttp wrap what they catch)."""
    seen = 0
    while e is not None and seen < 16:
        if isinstance(e, AccessDeniedError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


class _NotFound(UnreadableURIError):
    """The location does not exist (as opposed to: it could not be reached or read)."""


def _http_status(e: BaseException | None) -> int | None:
    while e is not None:
        status = getattr(e, "status", None)
        if isinstance(status, int):
            return status
        e = e.__cause__ or e.__context__
    return None


# Downloads: one at a time per cache target, within this process (threads) and across processes.
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


@contextmanager
def _download_lock(directory: str):
    with _locks_guard:
        lock = _locks.setdefault(directory, threading.Lock())
    with lock:
        fd = os.open(directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock


class Location:
    """A file or directory at a URI."""

    def __init__(self, uri: str | os.PathLike, cfg: IOConfig, revision: str | None = None, *, _fs=None, _path=None):
        uri = os.fspath(uri)
        self.uri = uri
        self.cfg = cfg
        self.revision = revision
        self.scheme = split_scheme(uri)[0]
        if _fs is not None:
            self.fs, self.path = _fs, _path
        else:
            self.fs, self.path = _fs_for(uri, cfg, revision)
        self.remote = self.scheme in REMOTE_SCHEMES
        self._info: dict | None = None

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    # -- errors --------------------------------------------------------------------------------

    def _call(self, what: str, fn, *a, **kw):
        """Run an fsspec call; any failure becomes an ``UnreadableURIError`` that names the URI
        (or the guard's ``AccessDeniedError``, however deep fsspec wrapped it)."""
        try:
            return fn(*a, **kw)
        except (UnreadableURIError, AccessDeniedError):
            raise
        except Exception as e:
            denied = _access_denied(e)
            if denied is not None:
                raise AccessDeniedError(f"{self.uri}: {denied.message}") from None
            raise self._unreadable(what, e) from None

    def _unreadable(self, what: str, e: Exception) -> UnreadableURIError:
        if isinstance(e, FileNotFoundError):
            # fsspec's HTTP backend turns every failure of HEAD/GET into FileNotFoundError: keep the cause.
            cause = e.__cause__ if self.scheme in HTTP_SCHEMES else None
            status = _http_status(cause)
            if cause is None or status in (404, 410):
                return _NotFound(f"{self.uri}: not found")
            reason = f"HTTP {status}" if status else f"{cause.__class__.__name__}: {_first_line(cause)}"
            return UnreadableURIError(f"{self.uri}: cannot {what} ({reason})")
        if isinstance(e, PermissionError):
            return UnreadableURIError(f"{self.uri}: permission denied ({_first_line(e)})")
        if isinstance(e, IsADirectoryError):
            return UnreadableURIError(f"{self.uri}: is a directory, expected a file")
        # network errors, auth errors, bad endpoints: all name the URI
        status = _http_status(e)
        reason = f"HTTP {status}" if status else f"{e.__class__.__name__}: {_first_line(e)}"
        return UnreadableURIError(f"{self.uri}: cannot {what} ({reason})")

    # -- metadata ------------------------------------------------------------------------------

    def info(self) -> dict:
        if self._info is None:
            self._info = self._call("stat", self.fs.info, self.path)
        return self._info

    def exists(self) -> bool:
        """False when the location does not exist; raises when it cannot be reached at all."""
        try:
            self.info()
            return True
        except _NotFound:
            return False

    def is_dir(self) -> bool:
        return self.info().get("type") == "directory"

    def size(self) -> int | None:
        size = self.info().get("size")
        return int(size) if size is not None else None

    @property
    def listable(self) -> bool:
        """Whether directories can be listed (an http(s) directory cannot)."""
        return self.scheme not in HTTP_SCHEMES

    @property
    def name(self) -> str:
        """The last path component (for http(s): of the URL path, without query)."""
        if self.scheme in HTTP_SCHEMES:
            return posixpath.basename(urllib.parse.urlsplit(self.uri).path.rstrip("/"))
        return posixpath.basename(self.path.rstrip("/").replace(os.sep, "/"))

    def child(self, name: str) -> "Location":
        if self.scheme in HTTP_SCHEMES:
            parts = urllib.parse.urlsplit(self.uri)
            base = parts.path if parts.path.endswith("/") else parts.path + "/"
            url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, base + name, parts.query, ""))
            return Location(url, self.cfg, self.revision, _fs=self.fs, _path=url)
        sep = "" if self.uri.endswith("/") else "/"
        path = os.path.join(self.path, name) if not self.remote else posixpath.join(self.path, name)
        return Location(self.uri + sep + name, self.cfg, self.revision, _fs=self.fs, _path=path)

    def parent(self) -> "Location":
        if self.scheme in HTTP_SCHEMES:
            parts = urllib.parse.urlsplit(self.uri)
            path = parts.path.rstrip("/").rsplit("/", 1)[0] + "/"
            url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))
            return Location(url, self.cfg, self.revision, _fs=self.fs, _path=url)
        parent_uri = self.uri.rstrip("/").rsplit("/", 1)[0] if "/" in self.uri.rstrip("/") else "."
        path = os.path.dirname(self.path.rstrip(os.sep)) if not self.remote else posixpath.dirname(self.path.rstrip("/"))
        return Location(parent_uri, self.cfg, self.revision, _fs=self.fs, _path=path)

    def sibling(self, name: str) -> "Location":
        return self.parent().child(name)

    def listdir(self) -> list[str]:
        path = self.path if self.remote else self._local()
        entries = self._call("list", self.fs.ls, path, detail=False)
        return sorted(posixpath.basename(str(e).rstrip("/")) for e in entries)

    # -- reading -------------------------------------------------------------------------------

    def _local(self) -> str:
        """The local file to open: symlinks resolved and checked against the guard."""
        return checked_local_path(self.path, self.uri, self.cfg.guard)

    def read_range(self, start: int, length: int) -> bytes:
        """Bytes ``[start, start + length)`` (fewer at the end of the file), by a ranged read.

        A remote file already in the cache is read from there.
        """
        if length <= 0:
            return b""
        if self.remote:
            cached = self.cached_path()
            if cached is None:
                return self._call("read", self._remote_range, start, length)
            path = cached
        else:
            path = self._local()

        def _read_local():
            with open(path, "rb") as f:
                f.seek(start)
                return f.read(length)
        return self._call("read", _read_local)

    def _remote_range(self, start: int, length: int) -> bytes:
        size = self.size()
        end = start + length if size is None else min(start + length, size)
        if end <= start:
            return b""
        if self.scheme in HTTP_SCHEMES:
            # One exact Range request: no read-ahead block, and a server that ignores Range is
            # streamed only as far as needed (fsspec raises for start > 0 in that case).
            with self.fs.open(self.path, "rb", block_size=end - start, cache_type="none", size=size) as f:
                f.seek(start)
                data = f.read(end - start)
        else:
            data = self.fs.cat_file(self.path, start=start, end=end)
        return bytes(data[: end - start])

    def read_all(self) -> bytes:
        """The whole file (small files: indexes, configs). Remote files go through the cache."""
        path = self.local_path()
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise UnreadableURIError(f"{self.uri}: cannot read ({e.strerror})") from None

    # -- cache ---------------------------------------------------------------------------------

    def _cache_target(self) -> str:
        info = self.info()
        if info.get("type") == "directory":
            raise UnreadableURIError(f"{self.uri}: is a directory, expected a file")
        version = info.get("ETag") or info.get("etag") or info.get("Last-Modified") or info.get("LastModified") \
            or info.get("last_modified") or info.get("mtime") or ""
        if isinstance(version, (dict, list, tuple)):
            version = repr(version)
        lfs = info.get("lfs")
        blob = info.get("blob_id") or (lfs.get("sha256") if isinstance(lfs, dict) else "") or ""
        tag = f"{self.scheme}://{self.path}\0{info.get('size')}\0{version}\0{blob}"
        digest = hashlib.sha256(tag.encode()).hexdigest()
        return os.path.join(self.cfg.cache_dir, "files", digest[:2], digest, self.name or "file")

    def cached_path(self) -> str | None:
        """The cached copy of this remote file, if a complete one is there (no download)."""
        if not self.remote:
            return self.path
        target = self._cache_target()
        return target if self._complete(target) else None

    def _complete(self, target: str) -> bool:
        size = self.size()
        try:
            return os.path.isfile(target) and (size is None or os.path.getsize(target) == size)
        except OSError:
            return False

    def local_path(self) -> str:
        """A local file with this content: the file itself (symlinks resolved, when guarded), or a
        cached download (made once)."""
        if not self.remote:
            return self._local()
        target = self._cache_target()
        if self._complete(target):
            return target
        directory = os.path.dirname(target)
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise UnreadableURIError(f"{self.uri}: cannot create cache directory {directory} ({e.strerror})") from None
        with _download_lock(directory):
            if self._complete(target):  # another thread or process fetched it meanwhile
                return target
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".download-")
            os.close(fd)
            try:
                self._call("download", self.fs.get_file, self.path, tmp)
                size = self.size()
                got = os.path.getsize(tmp)
                if size is not None and got != size:
                    raise UnreadableURIError(f"{self.uri}: download incomplete ({got} of {size} bytes)")
                os.replace(tmp, target)
            except OSError as e:
                raise UnreadableURIError(f"{self.uri}: cannot store download in {directory} ({e.strerror})") from None
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return target

    # -- writing -------------------------------------------------------------------------------

    def remove(self) -> None:
        self._call("remove", self.fs.rm, self.path)


def copy_local_to(local_path: str, dest: Location) -> None:
    """Upload or copy one local file to ``dest``."""
    if not dest.remote:
        os.makedirs(os.path.dirname(dest.path), exist_ok=True)
        shutil.copyfile(local_path, dest.path)
        return
    dest._call("upload", dest.fs.put_file, local_path, dest.path)


def redact_uri(uri: str) -> str:
    """The URI without credentials: no query string (presigned signatures), fragment or user:password@."""
    scheme, _ = split_scheme(uri)
    if scheme in ("", "file"):
        return uri
    parts = urllib.parse.urlsplit(uri)
    if not parts.netloc:  # sqlite:////abs/path: urlunsplit would fold the empty host into the path
        return uri.split("#", 1)[0].split("?", 1)[0]
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))

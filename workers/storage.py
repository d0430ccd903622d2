"""Artifact storage through fsspec: a local directory (embedded default) or s3://bucket/prefix.

The one abstraction of a job's folder on the service side: the API (reads, downloads, presigned
URLs, readiness), the task (clears leftovers, lists artifacts, writes the reports), the reaper
(clears what a lost attempt left) and the input policy (a job may read its own storage) all go
through ``Storage``. Inside the folder, ``model/`` is written by merging's ``Publisher`` (the
merge's output URI is ``Storage.model_uri``), which stages and publishes it atomically.

Layout per job::

    {root}/{job_id}/model/...        the merged model (published atomically by merging's Publisher)
    {root}/{job_id}/report.json      the job report
    {root}/{job_id}/report.html      the report page (when there are diagnostics or evaluation)
"""
from __future__ import annotations

import json
import os
import posixpath
import shutil

import fsspec

from merging.io.sources import storage_options_for
from workers.config import Settings


class Storage:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = settings.storage_root
        scheme = self.root.split("://", 1)[0].lower() if "://" in self.root else ""
        if scheme in ("", "file"):
            self.scheme = "file"
            path = self.root.split("://", 1)[1] if "://" in self.root else self.root
            self.base = os.path.abspath(os.path.expanduser(path))
            self.root = "file://" + self.base
            self.fs = fsspec.filesystem("file")
        elif scheme == "s3":
            self.scheme = "s3"
            self.base = self.root.split("://", 1)[1].strip("/")
            if not self.base:
                raise ValueError("SUBMERGE_STORAGE_URI: s3:// needs a bucket")
            self.fs = fsspec.filesystem("s3", **storage_options_for("s3", settings.io_config()))
        else:
            raise ValueError(f"SUBMERGE_STORAGE_URI: unsupported scheme {scheme!r} (use a path, file:// or s3://)")

    @property
    def local(self) -> bool:
        return self.scheme == "file"

    @property
    def local_root(self) -> str | None:
        """The directory holding the job folders on local storage; None on S3."""
        return self.base if self.local else None

    def _path(self, job_id: str, rel: str = "") -> str:
        parts = [self.base, job_id] + ([rel] if rel else [])
        return os.path.join(*parts) if self.local else posixpath.join(*parts)

    def job_uri(self, job_id: str) -> str:
        return f"{self.root}/{job_id}"

    def model_uri(self, job_id: str) -> str:
        return f"{self.root}/{job_id}/model"

    def uri(self, job_id: str, rel: str) -> str:
        return f"{self.root}/{job_id}/{rel}"

    def local_path(self, job_id: str, rel: str) -> str:
        assert self.local
        return self._path(job_id, rel)

    def clear_job(self, job_id: str) -> None:
        """Remove everything stored for a job (partial output of an earlier attempt, a cancelled job's leftovers)."""
        path = self._path(job_id)
        if self.local:
            shutil.rmtree(path, ignore_errors=True)
            return
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def exists(self, job_id: str, rel: str) -> bool:
        return bool(self.fs.exists(self._path(job_id, rel)))

    def has_files(self, job_id: str, rel: str = "") -> bool:
        path = self._path(job_id, rel)
        try:
            return bool(self.fs.find(path))
        except FileNotFoundError:
            return False

    def write_json(self, job_id: str, rel: str, data) -> None:
        self.write_bytes(job_id, rel, json.dumps(data, indent=1, sort_keys=False).encode())

    def write_bytes(self, job_id: str, rel: str, body: bytes) -> None:
        """Write one small file of a job, atomically on local storage."""
        path = self._path(job_id, rel)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(body)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, body)

    def read_bytes(self, job_id: str, rel: str) -> bytes:
        return self.fs.cat_file(self._path(job_id, rel))

    def size(self, job_id: str, rel: str) -> int:
        return int(self.fs.info(self._path(job_id, rel))["size"])

    def presign(self, job_id: str, rel: str) -> str:
        fs = self.fs
        public = self.settings.s3_public_endpoint_url
        if public:  # sign for the host clients use (signing is local: no request goes there)
            opts = storage_options_for("s3", self.settings.io_config())
            opts["endpoint_url"] = public
            fs = fsspec.filesystem("s3", **opts)
        return fs.sign(self._path(job_id, rel), expiration=self.settings.presign_expiry)

    def check(self) -> None:
        """Raise when the storage cannot be used (for /readyz)."""
        if self.local:
            os.makedirs(self.base, exist_ok=True)
            if not os.access(self.base, os.W_OK):
                raise PermissionError(f"{self.base} is not writable")
            return
        bucket = self.base.split("/", 1)[0]
        self.fs.ls(bucket, detail=False)

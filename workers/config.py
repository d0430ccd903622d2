"""Settings of the job system and the API (pydantic-settings). Every variable is ``SUBMERGE_``-prefixed;
the README's "Service settings" table lists them.

Embedded mode is the default: with no ``SUBMERGE_REDIS_URL`` jobs run in an in-process worker
pool, the job store is SQLite under the data directory and artifacts go to a local directory.
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Annotated, Literal

import torch
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from merging.io.sources import IOConfig
from merging.spec import parse_size

CSV = Annotated[list[str], NoDecode]


def _split(v):
    if v is None:
        return []
    if isinstance(v, str):
        return [p.strip() for p in v.split(",") if p.strip()]
    return list(v)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SUBMERGE_", extra="ignore", populate_by_name=True)

    # -- where things live -----------------------------------------------------------------------
    data_dir: str = Field("./data", description="Root of the embedded defaults: SQLite file, artifacts, cache.")
    database_url: str | None = Field(None, description="SQLAlchemy URL of the job store; default sqlite:///$DATA_DIR/submerge.db.")
    redis_url: str | None = Field(None, description="Redis for Celery; when set, jobs go through Celery workers (`submerge worker`).")
    storage_uri: str | None = Field(None, description="Artifact storage root: a directory, file:// or s3://bucket/prefix; default file://$DATA_DIR/artifacts.")
    cache_dir: str | None = Field(None, description="Download cache for remote inputs and staging for S3 output; default $DATA_DIR/cache.")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, ...) for storage and s3:// inputs.")
    s3_region: str | None = Field(None, description="S3 region name (optional).")
    s3_public_endpoint_url: str | None = Field(None, description=(
        "Endpoint that clients reach S3 at, used to sign download URLs when it differs from SUBMERGE_S3_ENDPOINT_URL."))
    presign_expiry: int = Field(3600, ge=1, description="Lifetime in seconds of presigned S3 download URLs.")

    # -- security --------------------------------------------------------------------------------
    auth: Literal["auto", "on", "off"] = Field("auto", description=(
        "auto: on when API keys are configured or the service is not embedded-on-loopback; off only for embedded mode on loopback."))
    api_keys: CSV = Field(default_factory=list, description="tenant:sha256hex(token), comma-separated.")
    file_roots: CSV = Field(default_factory=list, description="Directories file:// inputs may come from; embedded default: cwd and data dir.")
    allowed_schemes: CSV = Field(default_factory=lambda: ["file", "s3", "http", "https", "hf"], description="Input URI schemes accepted.")
    allowed_hosts: CSV = Field(default_factory=list, description="http(s) hosts accepted (exact or *.suffix); empty: any public host.")
    allowed_buckets: CSV = Field(default_factory=list, description="s3 buckets accepted for inputs; empty: any.")
    allowed_private_networks: CSV = Field(default_factory=list, description=(
        "CIDRs that http(s) inputs and callbacks may resolve to although private/loopback (SSRF guard exceptions)."))

    max_request_bytes: int = Field(1 << 20, ge=1, description="Largest request body accepted; larger ones get 413 request_too_large.")
    max_experts: int = Field(256, ge=2, description=(
        "Most experts one spec may list; more get 422 invalid_spec (field experts). Each expert is read for "
        "every tensor, so the cap bounds the work and memory one request can ask for."))
    access_log: bool = Field(True, description=(
        "Log one line per request on logger submerge.access (client, method, path with secret query values "
        "redacted, HTTP version, status, duration)."))

    # -- jobs ------------------------------------------------------------------------------------
    max_attempts: int = Field(3, ge=1, description="Attempts before a job whose worker keeps dying fails with worker_lost.")
    worker_concurrency: int | None = Field(None, ge=1, description="Jobs at once per worker; default one per GPU, 1 without GPU.")
    worker_nice: int = Field(10, ge=0, le=19, description=(
        "Lower the CPU priority of merge work by this much (embedded pool threads, Celery workers), so the API "
        "stays responsive while a merge uses every core; 0 keeps normal priority."))
    queue: str = Field("submerge", description="Celery queue name.")
    lease_seconds: float = Field(60.0, gt=0, description="A running job whose worker has not heartbeated for this long is retried or failed.")
    reaper_interval: float = Field(10.0, gt=0, description="How often stale leases are looked for (API and workers).")
    requeue_after: float = Field(30.0, gt=0, description=(
        "A job queued this many seconds after it was handed to the queue, with no message of it waiting there "
        "(e.g. Redis lost its data), is sent again by the reaper's sweep."))
    job_soft_time_limit: int = Field(6 * 3600, ge=1, description="Seconds after which a job is stopped with time_limit.")
    job_time_limit: int | None = Field(None, ge=1, description="Hard Celery time limit; default soft limit + 600 s.")
    progress_interval: float = Field(1.0, gt=0, description="Minimum seconds between progress writes to the job store.")
    cancel_poll_interval: float = Field(0.25, gt=0, description="How often a running job checks for cancellation.")
    memory_budget: int | str | None = Field(None, description=(
        "Memory one merge may take, e.g. '16GB' (options.memory_budget of a job may lower it, never raise it); "
        "default: half the memory of the machine or container."))
    debug_step_delay: float = Field(0.0, ge=0, description="Test hook: sleep this long per merged tensor.")
    allow_custom_adapters: bool = Field(False, description=(
        "Allow evaluation.adapter 'python:module:function' (imports and runs that function on the worker)."))

    # -- webhooks --------------------------------------------------------------------------------
    webhook_secret: str | None = Field(None, description="Signing secret (whsec_<base64> or raw text) for callback_url deliveries.")
    webhook_max_attempts: int = Field(5, ge=1, description="Delivery attempts per webhook.")
    webhook_timeout: float = Field(10.0, gt=0, description="Seconds per delivery attempt.")
    webhook_backoff: float = Field(1.0, ge=0, description="First retry delay in seconds; doubles each retry.")

    @field_validator("memory_budget")
    @classmethod
    def _budget(cls, v: int | str | None) -> int | None:
        return None if v in (None, "") else parse_size(v)

    @field_validator("api_keys", "file_roots", "allowed_schemes", "allowed_hosts", "allowed_buckets",
                     "allowed_private_networks", mode="before")
    @classmethod
    def _csv(cls, v):
        return _split(v)

    # -- derived ---------------------------------------------------------------------------------
    @property
    def embedded(self) -> bool:
        return not self.redis_url

    @property
    def data_path(self) -> str:
        return os.path.abspath(os.path.expanduser(self.data_dir))

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{os.path.join(self.data_path, 'submerge.db')}"

    @property
    def storage_root(self) -> str:
        uri = self.storage_uri or f"file://{os.path.join(self.data_path, 'artifacts')}"
        return uri.rstrip("/")

    @property
    def cache_path(self) -> str:
        return os.path.abspath(os.path.expanduser(self.cache_dir)) if self.cache_dir else os.path.join(self.data_path, "cache")

    @property
    def hard_time_limit(self) -> int:
        return self.job_time_limit or self.job_soft_time_limit + 600

    @property
    def roots(self) -> list[str]:
        roots = self.file_roots or ([os.getcwd(), self.data_path] if self.embedded else [self.data_path])
        return [os.path.realpath(os.path.expanduser(r)) for r in roots]

    def concurrency(self) -> int:
        if self.worker_concurrency:
            return self.worker_concurrency
        try:
            return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1
        except Exception:  # noqa: BLE001
            return 1

    def storage_options(self) -> dict:
        s3: dict = {}
        if self.s3_endpoint_url:
            s3["endpoint_url"] = self.s3_endpoint_url
        if self.s3_region:
            s3["client_kwargs"] = {"region_name": self.s3_region}
        return {"s3": s3}

    def io_config(self) -> IOConfig:
        return IOConfig(storage_options=self.storage_options(), cache_dir=self.cache_path)


@lru_cache
def get_settings() -> Settings:
    return Settings()

"""URI policy for everything a job makes the service fetch or call (SSRF guard).

* schemes: only ``SUBMERGE_ALLOWED_SCHEMES`` (plain paths count as ``file``);
* ``file://`` and plain paths: only under ``SUBMERGE_FILE_ROOTS`` (after resolving symlinks and ``..``),
  and so must every file inside a model directory: a link to a file outside the roots is refused;
* ``s3://``: only buckets in ``SUBMERGE_ALLOWED_BUCKETS`` when that is set;
* ``http(s)://``: only hosts in ``SUBMERGE_ALLOWED_HOSTS`` when that is set; the host name is
  resolved and *every* address it resolves to must be public, unless it lies in
  ``SUBMERGE_ALLOWED_PRIVATE_NETWORKS``. The check runs at submission and again when the
  worker starts the job (and before each webhook delivery).

``admit_spec`` is the one place a job's spec is validated (as ``MergeSpec``) and checked against
this policy on its way in: the API calls it when the job is submitted (and for a dry run), the
worker calls it again before it runs the job (the policy or the files may have changed since).

While a job runs, ``InputPolicy`` (the library's ``merging.io.guard.InputGuard``) applies the same
rules at the last moment: to each local file as it is opened (symlinks resolved), to every http(s)
redirect hop before it is followed, and to every address a host resolves to when the connection
is made (so DNS rebinding after the submission-time check is refused too).
"""
from __future__ import annotations

import fnmatch
import ipaddress
import os
import socket
import urllib.parse

from typing import Any

from merging.errors import AccessDeniedError
from merging.io.guard import IPAddress
from merging.io.sources import IOConfig, split_scheme
from merging.spec import MergeSpec
from workers.config import Settings
from workers.storage import Storage


class PolicyError(Exception):
    code = "uri_not_allowed"

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason  # without the field: InputPolicy words it for the file or hop at fault
        self.message = f"{field}: {reason}"


def _inside(path: str, roots: list[str]) -> bool:
    """Whether a resolved path lies under one of the (resolved) roots."""
    for root in roots:
        try:
            if os.path.commonpath([path, root]) == root:
                return True
        except ValueError:
            continue
    return False


def _outside_roots(roots: list[str]) -> str:
    return f"outside the allowed file roots ({', '.join(roots)}; see SUBMERGE_FILE_ROOTS)"


def check_file(uri: str, field: str, settings: Settings) -> None:
    scheme, rest = split_scheme(uri)
    if scheme == "file":
        host, _, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise PolicyError(field, f"file:// URIs with a host ({host!r}) are not allowed")
        path = "/" + path
    else:
        path = rest
    real = os.path.realpath(os.path.expanduser(path))
    roots = settings.roots
    if not _inside(real, roots):
        raise PolicyError(field, f"{uri} is {_outside_roots(roots)}")
    if os.path.isdir(real):  # refuse at once what the worker would refuse when it opens the file
        for name in sorted(os.listdir(real)):
            target = os.path.realpath(os.path.join(real, name))
            if not _inside(target, roots):
                raise PolicyError(field, f"{uri}: {name} links to {target}, {_outside_roots(roots)}")


def _host_allowed(host: str, patterns: list[str]) -> bool:
    host = host.lower().rstrip(".")
    return any(fnmatch.fnmatchcase(host, p.lower()) for p in patterns)


def _private_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, settings: Settings) -> bool:
    for net in settings.allowed_private_networks:
        try:
            if ip in ipaddress.ip_network(net, strict=False):
                return True
        except ValueError:
            continue
    return False


def resolve_addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out = []
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        out.append(ip)
    return out


def _check_url(uri: str, field: str, settings: Settings) -> tuple[str, int]:
    """The rules on an http(s) URL as written (no DNS); its host and port."""
    parts = urllib.parse.urlsplit(uri)
    host = parts.hostname
    if not host:
        raise PolicyError(field, f"{uri} has no host")
    if parts.username or parts.password:
        raise PolicyError(field, "credentials in URLs are not allowed")
    if settings.allowed_hosts and not _host_allowed(host, settings.allowed_hosts):
        raise PolicyError(field, f"host {host!r} is not in SUBMERGE_ALLOWED_HOSTS")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise PolicyError(field, f"{uri} has an invalid port") from None
    return host, port


def _check_address(host: str, ip: IPAddress, field: str, settings: Settings) -> None:
    if not ip.is_global and not _private_allowed(ip, settings):
        raise PolicyError(field, f"host {host!r} resolves to non-public address {ip} "
                                 "(private, loopback and link-local targets are refused; see SUBMERGE_ALLOWED_PRIVATE_NETWORKS)")


def check_http(uri: str, field: str, settings: Settings) -> None:
    host, port = _check_url(uri, field, settings)
    try:
        addresses = resolve_addresses(host, port)
    except (socket.gaierror, UnicodeError, OSError) as e:
        raise PolicyError(field, f"cannot resolve host {host!r} ({e})") from None
    if not addresses:
        raise PolicyError(field, f"host {host!r} resolves to no address")
    for ip in addresses:
        _check_address(host, ip, field, settings)


def check_uri(uri: str, field: str, settings: Settings) -> None:
    scheme, rest = split_scheme(uri)
    effective = scheme or "file"
    if effective not in [s.lower() for s in settings.allowed_schemes]:
        raise PolicyError(field, f"URI scheme {effective!r} is not allowed (allowed: {', '.join(settings.allowed_schemes)})")
    if effective == "file":
        check_file(uri, field, settings)
    elif effective == "s3":
        bucket = rest.split("/", 1)[0]
        if settings.allowed_buckets and bucket not in settings.allowed_buckets:
            raise PolicyError(field, f"bucket {bucket!r} is not in SUBMERGE_ALLOWED_BUCKETS")
    elif effective in ("http", "https"):
        check_http(uri, field, settings)


def check_callback(url: str, settings: Settings, field: str = "callback_url") -> None:
    scheme = split_scheme(url)[0]
    if scheme not in ("http", "https"):
        raise PolicyError(field, "callback_url must be http(s)")
    check_http(url, field, settings)


def check_spec(spec: MergeSpec, settings: Settings) -> None:
    """Every input URI of a MergeSpec (and its callback_url)."""
    check_uri(spec.base.uri, "base.uri", settings)
    for i, e in enumerate(spec.experts):
        check_uri(e.uri, f"experts.{i}.uri", settings)
        if e.calibration is not None and e.calibration.uri is not None:
            check_uri(e.calibration.uri, f"experts.{i}.calibration.uri", settings)
        if e.calibration is not None and e.calibration.data is not None:
            check_uri(e.calibration.data.uri, f"experts.{i}.calibration.data.uri", settings)
    if spec.evaluation is not None:
        for i, t in enumerate(spec.evaluation.tasks):
            check_uri(t.test.uri, f"evaluation.tasks.{i}.test.uri", settings)
            if t.validation is not None:
                check_uri(t.validation.uri, f"evaluation.tasks.{i}.validation.uri", settings)
        if spec.evaluation.adapter.startswith("python:") and not settings.allow_custom_adapters:
            raise PolicyError("evaluation.adapter", "custom Python model adapters are disabled on this service "
                              "(SUBMERGE_ALLOW_CUSTOM_ADAPTERS)")
    if spec.callback_url:
        check_callback(spec.callback_url, settings)


def admit_spec(data: dict[str, Any] | MergeSpec, settings: Settings) -> MergeSpec:
    """A job's spec on its way in: validated as a ``MergeSpec`` (pydantic's ``ValidationError``
    names every problem) and every URI it names checked against the policy (``PolicyError``)."""
    spec = data if isinstance(data, MergeSpec) else MergeSpec.model_validate(data)
    check_spec(spec, settings)
    return spec


class InputPolicy:
    """The URI policy as the library's ``InputGuard``: asked while a job reads its inputs.

    Besides ``SUBMERGE_FILE_ROOTS``, local files may come from the service's own directories: its
    local artifact storage (a job evaluates the model it just published there) and its cache
    (calibration statistics a job captured).
    """

    def __init__(self, settings: Settings, storage_path: str | None = None):
        self.settings = settings
        own = [settings.cache_path] + ([storage_path] if storage_path else [])
        self.roots = settings.roots + [os.path.realpath(p) for p in own]

    def check_file(self, real_path: str, uri: str) -> None:
        if not _inside(real_path, self.roots):
            shown = uri if real_path == os.path.abspath(uri) else f"{uri} (resolves to {real_path})"
            raise AccessDeniedError(f"{shown} is {_outside_roots(self.settings.roots)}")

    def check_url(self, url: str) -> None:
        scheme = split_scheme(url)[0]
        if scheme not in ("http", "https") or scheme not in [s.lower() for s in self.settings.allowed_schemes]:
            raise AccessDeniedError(f"request to {url}: scheme {scheme!r} is not allowed")
        try:
            _check_url(url, "url", self.settings)
        except PolicyError as e:
            raise AccessDeniedError(f"request to {url} refused: {e.reason}") from None

    def check_address(self, host: str, address: IPAddress) -> None:
        try:
            _check_address(host, address, "url", self.settings)
        except PolicyError as e:
            raise AccessDeniedError(f"connection refused by policy: {e.reason}") from None


def job_io_config(settings: Settings, storage: Storage | None = None) -> IOConfig:
    """How a job reads its inputs: the service's storage options, guarded by ``InputPolicy`` (which
    also admits the job storage's own directory when it is local)."""
    io = settings.io_config()
    io.guard = InputPolicy(settings, (storage or Storage(settings)).local_root)
    return io

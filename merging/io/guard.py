"""Enforcing an input policy on every file the library opens and every HTTP connection it makes.

The library does not decide what is allowed: a service hands it an ``InputGuard`` (through
``IOConfig.guard``) and the library asks it at the last moment before it touches anything:

* a local file: its path with every symlink resolved, just before it is opened (the opened path
  is the resolved one, so a link swapped after the check is not followed);
* an http(s) URL: the URL of the request and of every redirect hop, before the hop is sent;
* every address an http(s) host name resolves to, when the connection is made. The connection
  uses exactly the addresses that were checked, so a DNS answer that changes between a
  submission-time check and the download (DNS rebinding) is caught here.

Without a guard (the CLI: its user reads what they can) nothing is checked.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from typing import Protocol

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from merging.errors import AccessDeniedError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class InputGuard(Protocol):
    """Raises ``merging.errors.AccessDeniedError`` for anything a job may not read."""

    def check_file(self, real_path: str, uri: str) -> None:
        """``real_path``: the file or directory behind ``uri`` with all symlinks resolved."""

    def check_url(self, url: str) -> None:
        """Scheme, host and form of one request URL (no DNS)."""

    def check_address(self, host: str, address: IPAddress) -> None:
        """One address that ``host`` resolved to (or the host itself when it is an IP literal)."""


def checked_local_path(path: str, uri: str, guard: InputGuard | None) -> str:
    """The path to open for a local file: resolved and checked when there is a guard."""
    if guard is None:
        return path
    real = os.path.realpath(path)
    guard.check_file(real, uri)
    return real


def _address(host: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


def _check_hop(guard: InputGuard, url: URL) -> None:
    guard.check_url(str(url))
    literal = _address(url.raw_host or "")
    if literal is not None:  # aiohttp connects to IP literals without asking the resolver
        guard.check_address(url.raw_host or "", literal)


class _CheckedResolver(AbstractResolver):
    """The system resolver, with every answer checked before aiohttp connects to it."""

    def __init__(self, guard: InputGuard):
        self._guard = guard
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        answers = await self._inner.resolve(host, port, family)
        for answer in answers:
            ip = _address(answer["host"])
            if ip is None:
                raise AccessDeniedError(f"host {host!r} resolved to {answer['host']!r}, which is not an IP address")
            self._guard.check_address(host, ip)
        return answers

    async def close(self) -> None:
        await self._inner.close()


def guarded_http_client(guard: InputGuard):
    """A ``get_client`` for fsspec's HTTPFileSystem whose sessions check every hop and address."""

    async def on_request_start(session, ctx, params) -> None:
        _check_hop(guard, params.url)

    async def on_request_redirect(session, ctx, params) -> None:
        location = params.response.headers.get("Location") or params.response.headers.get("URI")
        if location:
            # The next hop, joined as aiohttp will join it; refused before it is sent.
            hop = params.url.join(URL(location))
            try:
                _check_hop(guard, hop)
            except AccessDeniedError as e:
                raise AccessDeniedError(f"redirect to {hop.with_query(None)} refused: {e.message}") from None

    async def get_client(**kwargs) -> aiohttp.ClientSession:
        trace = aiohttp.TraceConfig()
        trace.on_request_start.append(on_request_start)
        trace.on_request_redirect.append(on_request_redirect)
        kwargs.pop("connector", None)  # our connector is the one that checks addresses
        kwargs["trace_configs"] = list(kwargs.get("trace_configs") or []) + [trace]
        kwargs["trust_env"] = False  # an environment proxy would resolve and connect out of our sight
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=_CheckedResolver(guard)), **kwargs)

    return get_client

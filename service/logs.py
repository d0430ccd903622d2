"""Logging of ``submerge serve``: one format for uvicorn's and our loggers, and one access line per request.

``logging_config(level)`` is the dictConfig ``submerge serve`` hands to uvicorn: uvicorn's loggers,
the ``submerge.*`` loggers and anything else that warns (root) write ``FORMAT`` lines to stderr.
uvicorn's own access log stays off: it would print query strings (presigned signatures, tokens)
as they came, and its formatter needs the record's arguments. The access lines come from
``AccessLog`` instead, a pure ASGI middleware (added by ``create_app`` unless
``SUBMERGE_ACCESS_LOG=false``) that logs on ``submerge.access``:

    2026-12-02 10:00:00,123 INFO submerge.access: 127.0.0.1:50312 - "GET /v1/merges?token=[redacted] HTTP/1.1" 200 1.4 ms

Every record also passes the redacting record factory (``workers.redact.install_log_redaction``).
"""
from __future__ import annotations

import logging
import time
from urllib.parse import quote

from workers.redact import redact_query

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

access_log = logging.getLogger("submerge.access")


def logging_config(level: str = "info") -> dict:
    """dictConfig for uvicorn's ``log_config``; ``level`` is a uvicorn log level name (``trace``
    included: uvicorn registers that level name before it applies the config)."""
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"format": FORMAT}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}},
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.access": {"handlers": [], "propagate": False},  # AccessLog writes the access lines
            "submerge": {"handlers": ["stderr"], "level": level, "propagate": False},
        },
        "root": {"handlers": ["stderr"], "level": "WARNING"},
    }


def _client(scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


def _target(scope) -> str:
    """Path and query as requested, with the values of secret-looking query parameters redacted.
    The decoded path is quoted again (spaces, quotes, line breaks cannot end up in the line)."""
    path = quote(scope.get("root_path", "") + scope["path"], safe="/:@!$&'()*+,;=~")
    query = scope.get("query_string", b"").decode("latin-1")
    return f"{path}?{redact_query(query)}" if query else path


class AccessLog:
    """One INFO line per HTTP request on ``submerge.access``: client, method, path with redacted
    query, HTTP version, status and the time until the app returned."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not access_log.isEnabledFor(logging.INFO):
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500  # an exception that escapes before the response starts becomes a 500

        async def send_with_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            access_log.info('%s - "%s %s HTTP/%s" %d %.1f ms', _client(scope), scope["method"], _target(scope),
                            scope.get("http_version", "1.1"), status, (time.perf_counter() - start) * 1000)

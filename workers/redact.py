"""Keep secrets out of logs and job records.

* URIs lose credentials, query strings and fragments (``merging.io.sources.redact_uri``): presigned
  URL signatures, ``user:pass@`` and tokens in callback URLs never reach the job record or a log.
* ``Bearer <token>`` / ``Authorization: ...`` values and registered secrets (the webhook secret,
  S3 keys from the environment) are replaced by ``[redacted]``.

The job store keeps the spec exactly as submitted (the worker needs the real URIs to read the
inputs); everything the API returns, every stored error message and event, and every log record is
passed through these functions.
"""
from __future__ import annotations

import copy
import logging
import os
import re
import threading
from collections.abc import Mapping
from urllib.parse import unquote_plus

from merging.io.sources import redact_uri

__all__ = ["MASK", "install_log_redaction", "redact_obj", "redact_query", "redact_spec", "redact_text", "redact_uri",
           "register_secret"]

_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'\"<>`]+")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]+")
_AUTH_HEADER = re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)(?:(?:bearer|basic)\s+)?[^'\"\s,}]+")
_SECRETS: set[str] = set()
_LOCK = threading.Lock()
MASK = "[redacted]"
# Query parameters whose values are secrets: presigned S3/GCS/Azure signatures and credentials
# (X-Amz-Signature, X-Amz-Credential, X-Amz-Security-Token, Signature, sig), tokens (token,
# access_token), API keys, passwords, session ids. Matched anywhere in the name, case-insensitively:
# redacting a harmless value in a log line costs nothing, missing a secret does.
_SECRET_PARAM = re.compile(r"(?i)sig|token|secret|passw|credential|auth|key|session")


def register_secret(value: str | None) -> None:
    """Strings that must never appear in a log or a job record (the webhook secret, ...)."""
    if value and len(value) >= 6:
        with _LOCK:
            _SECRETS.add(value)


def redact_text(text: str | None) -> str | None:
    if not text:
        return text
    if "://" in text:
        text = _URL.sub(lambda m: redact_uri(m.group(0)), text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {MASK}", text)
    text = _AUTH_HEADER.sub(lambda m: m.group(1) + MASK, text)
    for s in tuple(_SECRETS):
        if s in text:
            text = text.replace(s, MASK)
    return text


def redact_query(query: str) -> str:
    """A URL query string (``a=1&X-Amz-Signature=...``) with the value of every parameter whose name
    looks secret replaced by ``[redacted]``; the other parameters stay readable (for access logs)."""
    parts = []
    for part in query.split("&"):
        name, eq, _ = part.partition("=")
        if eq and _SECRET_PARAM.search(unquote_plus(name)):
            part = f"{name}={MASK}"
        parts.append(part)
    return "&".join(parts)


def redact_obj(obj):
    """A JSON-like value with every string passed through redact_text (copies; the input is unchanged)."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    return obj


def redact_spec(spec: dict | None) -> dict | None:
    """A stored spec as the API shows it: input, calibration, output and callback URIs redacted."""
    if spec is None:
        return None
    return redact_obj(copy.deepcopy(spec))


_installed = False


def install_log_redaction() -> None:
    """Every log record of this process (ours, merging's, httpx's, Celery's) is redacted once, when
    it is created: message with its arguments, and the formatted traceback."""
    global _installed
    with _LOCK:
        if _installed:
            return
        _installed = True
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        register_secret(os.environ.get(name))
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        try:
            _redact_record(record)
            if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
                record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        except Exception:  # noqa: BLE001 - never break logging
            pass
        return record

    logging.setLogRecordFactory(factory)


def _redact_args(args):
    if isinstance(args, Mapping):
        return {k: redact_text(v) if isinstance(v, str) else v for k, v in args.items()}
    if isinstance(args, tuple):
        return tuple(redact_text(a) if isinstance(a, str) else a for a in args)
    return args


def _redact_record(record: logging.LogRecord) -> None:
    """Redact a record's message in place, keeping ``record.args`` whenever that is safe.

    Formatters may need the arguments themselves (uvicorn's access formatter unpacks five of them),
    so a record without secrets is left alone, and one with secrets gets its message template and
    each string argument redacted separately. Only when that does not yield a clean message (a
    secret split across arguments, inside a non-string argument, or a template whose placeholders
    redaction changed) is the record collapsed to its redacted text with no arguments."""
    message = record.getMessage()
    clean = redact_text(message)
    if clean == message:
        return
    msg = redact_text(record.msg) if isinstance(record.msg, str) else record.msg
    args = _redact_args(record.args)
    try:
        formatted = str(msg) % args if args else str(msg)  # what LogRecord.getMessage() will do
        safe = redact_text(formatted) == formatted
    except Exception:  # noqa: BLE001 - placeholders and arguments no longer fit
        safe = False
    record.msg, record.args = (msg, args) if safe else (clean, ())

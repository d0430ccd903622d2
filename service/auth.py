"""API keys with tenants. ``SUBMERGE_API_KEYS="tenantA:<sha256 hex of token>,tenantB:<...>"``; clients
send ``Authorization: Bearer <token>``. Only hashes are configured, never tokens."""
from __future__ import annotations

import hashlib
import hmac
import ipaddress

from service.errors import ApiError
from workers.config import Settings

ANONYMOUS = "default"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_keys(entries: list[str]) -> list[tuple[str, str]]:
    out = []
    for entry in entries:
        tenant, sep, digest = entry.rpartition(":")
        digest = digest.strip().lower()
        if not sep or not tenant.strip() or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"SUBMERGE_API_KEYS: {entry!r} is not tenant:<64 hex sha256>")
        out.append((tenant.strip(), digest))
    return out


def _loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


def auth_required(settings: Settings, server_host: str | None) -> bool:
    if settings.auth == "off":
        return False
    if settings.auth == "on" or settings.api_keys:
        return True
    return not (settings.embedded and _loopback(server_host))


def authenticate(settings: Settings, keys: list[tuple[str, str]], authorization: str | None, server_host: str | None) -> str:
    """The caller's tenant, or an ApiError(401)."""
    if not auth_required(settings, server_host):
        return ANONYMOUS
    challenge = {"WWW-Authenticate": "Bearer"}
    if not keys:
        raise ApiError(401, "unauthorized", "authentication is required but no API keys are configured "
                       "(set SUBMERGE_API_KEYS, or SUBMERGE_AUTH=off to switch authentication off)", headers=challenge)
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "missing bearer token (Authorization: Bearer <api key>)", headers=challenge)
    digest = hash_token(token.strip())
    tenant = None
    for t, d in keys:  # compare against every key: time does not depend on which one matches
        if hmac.compare_digest(d, digest):
            tenant = t
    if tenant is None:
        raise ApiError(401, "unauthorized", "invalid API key", headers=challenge)
    return tenant

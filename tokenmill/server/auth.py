"""Bearer keys and tenancy: each key is a tenant that sees only its own files and batches.

Tenants are stored by a digest of their key, so the store (and anything that prints it) never holds
a key; keys are compared in constant time against every configured key.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from fastapi import Request

from tokenmill.errors import ConfigError
from tokenmill.server.errors import ApiError

LOCAL_TENANT = "local"


def tenant_of(key: str) -> str:
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:24]


def match_key(given: str, keys: tuple[str, ...]) -> str | None:
    """The configured key equal to ``given``; every key is compared, so timing tells nothing."""
    found = None
    for key in keys:
        if hmac.compare_digest(given.encode(), key.encode()):
            found = key
    return found


def tenant(request: Request) -> str:
    """FastAPI dependency: the caller's tenant, or 401 in OpenAI's shape."""
    keys: tuple[str, ...] = request.app.state.settings.api_keys
    if not keys:
        return LOCAL_TENANT
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError(401, "Missing bearer key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    key = match_key(given.strip(), keys)
    if key is None:
        raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")
    return tenant_of(key)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, keys: tuple[str, ...]) -> None:
    """Refuse to serve a network without keys: anyone who can reach it could read every file."""
    if not keys and not is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host} without API keys: set TOKENMILL_API_KEYS=key1,key2 or bind 127.0.0.1"
        )

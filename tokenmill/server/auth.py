"""Keys, callers and tenancy: each API key is a tenant that sees only its own files, batches and jobs.

Who is calling is settled from the request's headers alone, by :class:`tokenmill.server.gate.Gate`, before
any body byte is read; routes read the answer through the dependencies below. Tenants are stored by a
digest of their key, so the store (and anything that prints it) never holds a key; keys are compared in
constant time against every configured key. An admin key is the operator: the same owner as the CLI's jobs,
and the only caller that sees every tenant's jobs, the workers and ``/metrics``. With no key configured
the server is open (and ``serve`` binds loopback only): every caller is the operator.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
from dataclasses import dataclass

from fastapi import Request

from tokenmill.config import Settings
from tokenmill.errors import ConfigError
from tokenmill.server.errors import ApiError
from tokenmill.store.tables import OPERATOR

CALLER = "tokenmill.caller"  # the scope key the gate leaves the caller under


@dataclass(frozen=True)
class Caller:
    """``owner``: whose files, batches and jobs the caller reads and writes; ``operator``: sees everyone's."""

    owner: str
    operator: bool


OPEN = Caller(OPERATOR, operator=True)


def tenant_of(key: str) -> str:
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:24]


def match_key(given: str, keys: tuple[str, ...]) -> str | None:
    """The configured key equal to ``given``; every key is compared, so timing tells nothing."""
    found = None
    for key in keys:
        if hmac.compare_digest(given.encode(), key.encode()):
            found = key
    return found


def _credential(authorization: str, *, basic: bool) -> str | None:
    """The key in an ``Authorization`` header: ``Bearer <key>``, or (where ``basic``) HTTP Basic with the key as
    the password (or as the user name, for a browser's login box filled the other way round)."""
    scheme, _, given = authorization.partition(" ")
    given = given.strip()
    if scheme.lower() == "bearer":
        return given or None
    if basic and scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(given, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password or user or None
    return None


def identify(settings: Settings, authorization: str, *, basic: bool = False) -> Caller | str:
    """The caller a header names, or why it names none (a one-line message for the 401)."""
    if not settings.keyed:
        return OPEN
    given = _credential(authorization, basic=basic)
    if given is None:
        return "Missing API key: send 'Authorization: Bearer <key>'"
    if match_key(given, settings.admin_keys) is not None:
        return OPEN
    key = match_key(given, settings.api_keys)
    if key is None:
        return "Incorrect API key provided"
    return Caller(tenant_of(key), operator=False)


def caller(request: Request) -> Caller:
    """FastAPI dependency: the caller the gate let in (a route the gate leaves open has none: 401)."""
    found = request.scope.get(CALLER)
    if not isinstance(found, Caller):
        raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    return found


def tenant(request: Request) -> str:
    """FastAPI dependency: the owner of what this request reads and writes."""
    return caller(request).owner


def operator(request: Request) -> Caller:
    """FastAPI dependency: an operator, or 403 for a tenant."""
    found = caller(request)
    if not found.operator:
        raise ApiError(403, "This needs an admin key (TOKENMILL_ADMIN_KEYS)", code="permission_denied")
    return found


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

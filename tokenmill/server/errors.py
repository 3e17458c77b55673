"""Errors in OpenAI's shape, so the official SDK raises its own typed exceptions (NotFoundError, ...)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.config import mask_text
from tokenmill.errors import (
    DatasetError,
    JobNotFound,
    NoResultsYet,
    ServiceUnavailable,
    StoreError,
    StoreFull,
    TokenmillError,
    UnknownModelError,
    UsageError,
)
from tokenmill.store import DB_ERRORS
from tokenmill.store.db import log_reason, unavailable_cause

log = logging.getLogger(__name__)

_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error", 500: "server_error"}
# Every TokenmillError a route can meet, mapped once: (status, code, what the caller is told). The most
# specific class wins (the table is searched along the exception's MRO). Store messages name the database
# (host, user, db) and the driver's reason: the log gets them (masked), the caller a sentence.
_MAPPED: dict[type, tuple[int, str, str | None]] = {
    ServiceUnavailable: (503, "service_unavailable", "the store is unreachable; try again shortly"),
    StoreFull: (503, "store_full", "the store's disk is full; try again once the operator has freed space"),
    JobNotFound: (404, "not_found", None),
    NoResultsYet: (409, "no_results", None),
    StoreError: (500, "store_error", "internal error (see the server log)"),
    DatasetError: (400, "invalid_request", None),
    UnknownModelError: (400, "model_not_found", None),
    UsageError: (400, "invalid_request", None),
    TokenmillError: (500, "server_error", "internal error (see the server log)"),
}


class ApiError(Exception):
    """An answer the client can act on: status, one-line message, the offending parameter."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status
        self.message = message
        self.param = param
        self.code = code


def not_found(kind: str, ident: str) -> ApiError:
    return ApiError(404, f"No such {kind}: {ident!r}", param="id", code="not_found")


def body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, object]:
    kind = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def openapi_with_our_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """The document as the server answers: a malformed request is a 400 (not FastAPI's 422), every route
    but the open ones may answer 401 (the gate), and a body past its cap 413, all in OpenAI's error shape."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    components["Error"] = _ERROR_SCHEMA
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            if responses.pop("422", None) is not None:
                responses["400"] = _error_response("Invalid request")
            if path != "/healthz":
                responses["401"] = _error_response("Missing or unknown API key")
            if method in ("post", "put", "patch"):
                responses["413"] = _error_response("Request body over its cap")
    return schema


def install(app: FastAPI) -> None:
    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            plain = get_openapi(title=app.title, version=app.version, routes=app.routes)
            app.openapi_schema = openapi_with_our_errors(plain)
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(body(exc.status_code, exc.message, exc.param, exc.code), status_code=exc.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        return JSONResponse(body(exc.status_code, str(exc.detail)), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        """400 as OpenAI answers a malformed request (FastAPI's own would be 422), naming the parameter."""
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid request')}" if param else str(first.get("msg", "invalid"))
        return JSONResponse(body(400, message, param, "invalid_value"), status_code=400)

    @app.exception_handler(TokenmillError)
    async def _ours(_: Request, exc: TokenmillError) -> JSONResponse:
        return tokenmill_error(exc)

    async def _database(_: Request, exc: Exception) -> JSONResponse:
        return database_error(exc)

    for kind in DB_ERRORS:
        app.add_exception_handler(kind, _database)

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled %s: %s", type(exc).__name__, mask_text(str(exc)))
        return JSONResponse(body(500, "internal error (see the server log)"), status_code=500)


def tokenmill_error(exc: TokenmillError) -> JSONResponse:
    status, code, told = next(_MAPPED[c] for c in type(exc).__mro__ if c in _MAPPED)
    if told is not None:
        log.warning("%s answered %d: %s", type(exc).__name__, status, mask_text(str(exc)))
    return JSONResponse(body(status, told or str(exc), None, code), status_code=status)


def database_error(exc: Exception) -> JSONResponse:
    """A driver error no store call turned into ours: the store being unavailable (503, worth a retry) or a
    bug (:func:`tokenmill.store.db.unavailable_cause` decides). Only the driver's own first line is logged:
    SQLAlchemy's message would add the statement's parameters (tenants' data)."""
    cause = unavailable_cause(exc)
    if cause is not None:
        return tokenmill_error(cause)
    log.error("unhandled %s: %s", type(exc).__name__, log_reason(exc))
    return JSONResponse(body(500, "internal error (see the server log)"), status_code=500)

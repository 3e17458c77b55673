"""The door in front of every route: who is calling, from the headers alone, and how many body bytes a
request may send, counted as they stream.

A pure ASGI middleware, because FastAPI reads and parses a body (a whole multipart upload, spooled to
disk) before any dependency runs: a key checked in a dependency comes after a stranger's 300 MiB. Here an
unknown caller is answered 401 without ``receive`` ever being called, and the answer closes the
connection so the server does not drain the rest either. Bodies are counted message by message, so a
chunked body with no ``Content-Length`` meets the same cap as a declared one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.config import Settings
from tokenmill.server.auth import CALLER, Caller, identify
from tokenmill.server.errors import body

# Routes anyone may call: liveness for load balancers, and the API's description (no data in either).
OPEN_PATHS = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
JSON_MAX_BYTES = 1 << 20  # every body but an upload: a batch's create request is a few hundred bytes
MULTIPART_OVERHEAD = 64 * 1024  # an upload's form fields and boundaries around the file's bytes
BASIC_CHALLENGE = (b"www-authenticate", b'Basic realm="tokenmill dashboard", charset="UTF-8"')


class _TooLarge(Exception):
    """Raised into the app from ``receive`` once a body passes its cap (the 413 is already sent)."""


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers") or ():
        if key == name:
            return bytes(value).decode("latin-1")
    return ""


def is_dashboard(path: str) -> bool:
    return path == "/" or path == "/dashboard" or path.startswith("/dashboard/")


class Gate:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def _cap(self, scope: Scope) -> tuple[int, str, str | None, str]:
        """(bytes, message, param, code) of the body cap for this request's route."""
        if scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/files":
            limit = self.settings.file_max_bytes
            return limit + MULTIPART_OVERHEAD, f"file is larger than {limit} bytes", "file", "file_too_large"
        return JSON_MAX_BYTES, f"request body is larger than {JSON_MAX_BYTES} bytes", None, "request_too_large"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        dashboard = is_dashboard(scope["path"])
        who = identify(self.settings, _header(scope, b"authorization"), basic=dashboard)
        if isinstance(who, Caller):
            scope[CALLER] = who
        elif scope["path"] not in OPEN_PATHS:
            extra = [BASIC_CHALLENGE] if dashboard else []
            await answer(send, 401, who, None, "invalid_api_key", extra)
            return
        cap, message, param, code = self._cap(scope)
        length = _header(scope, b"content-length").strip()
        if length.isdigit() and int(length) > cap:
            await answer(send, 413, message, param, code)
            return
        await self._counted(scope, receive, send, cap, (message, param, code))

    async def _counted(
        self, scope: Scope, receive: Receive, send: Send, cap: int, refusal: tuple[str, str | None, str]
    ) -> None:
        flow = _Flow()

        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                flow.received += len(message.get("body", b""))
                if flow.received > cap:
                    if not flow.started:
                        flow.refused = True
                        await answer(send, 413, *refusal)
                    raise _TooLarge
            return message

        async def guarded(message: Message) -> None:
            if flow.refused:  # the 413 went out: whatever the app answers to the error is dropped
                return
            if message["type"] == "http.response.start":
                flow.started = True
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except _TooLarge:
            if not flow.refused:
                raise


@dataclass
class _Flow:
    received: int = 0
    started: bool = False
    refused: bool = False


async def answer(
    send: Send,
    status: int,
    message: str,
    param: str | None,
    code: str | None,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """An OpenAI-shaped error that also closes the connection: the body it did not read is never drained."""
    payload = json.dumps(body(status, message, param, code)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"connection", b"close"),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})

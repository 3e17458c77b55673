"""The FastAPI application: one app, the store on ``app.state``, the API and the dashboard as routers.

The store is the truth and the server holds no state of its own, so any number of replicas can serve
the same fleet (docs/architecture.md).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.config import Settings
from tokenmill.store import Store

if TYPE_CHECKING:
    from tokenmill.server.embedded import Background
    from tokenmill.server.health import ServerMetrics


def create_app(settings: Settings, store: Store | None = None, background: Background | None = None) -> FastAPI:
    """``background`` (the batch driver, and in embedded mode the dispatcher and local workers) runs for
    the app's lifespan; without it the app only answers requests (tests, a dashboard-only replica)."""
    from tokenmill.server import api, dashboard, errors
    from tokenmill.server.gate import Gate
    from tokenmill.server.health import ServerMetrics

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if background is not None:
            background.start()
        try:
            yield
        finally:
            if background is not None:
                background.stop()

    app = FastAPI(title="tokenmill", version="1", lifespan=lifespan)
    app.state.settings = settings
    app.state.store = store if store is not None else Store(settings.database_url)
    app.state.metrics = ServerMetrics(app.state.store)
    errors.install(app)
    app.include_router(api.router)
    app.include_router(dashboard.router)
    app.add_middleware(Gate, settings=settings)
    app.add_middleware(_Measure, metrics=app.state.metrics)
    return app


class _Measure:
    """Counts and times every request by its route template (never its raw path: ids would explode labels)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

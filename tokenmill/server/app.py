"""The FastAPI application: one app, the store on ``app.state``, the API and the dashboard as routers.

The store is the truth and the server holds no state of its own, so any number of replicas can serve
the same fleet (docs/architecture.md).
"""

from __future__ import annotations

from fastapi import FastAPI

from tokenmill.config import Settings
from tokenmill.store import Store


def create_app(settings: Settings, store: Store | None = None) -> FastAPI:
    from tokenmill.server import api, dashboard

    app = FastAPI(title="tokenmill", version="1")
    app.state.settings = settings
    app.state.store = store if store is not None else Store(settings.database_url)
    app.include_router(api.router)
    app.include_router(dashboard.router)
    return app

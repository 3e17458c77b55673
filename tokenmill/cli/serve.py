"""`tokenmill serve`: the OpenAI-compatible Files + Batches API (and the dashboard) over the store."""

from __future__ import annotations

import logging
import os
from typing import Annotated

import typer

from tokenmill.cli.common import console, open_store, settings_from


def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on (non-loopback needs TOKENMILL_API_KEYS)")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="TCP port", min=1, max=65535)] = 8080,
    workers: Annotated[int | None, typer.Option(help="Embedded: local worker processes per model")] = None,
    idle_stop: Annotated[float, typer.Option(help="Embedded: stop a model's workers after this many idle seconds")] = (
        60.0
    ),
) -> None:
    """Serve the OpenAI Files + Batches API; with no database/broker configured, also run the work.

    Example: TOKENMILL_API_KEYS=sk-team-a tokenmill serve --host 127.0.0.1 --port 8080
    """
    import uvicorn

    from tokenmill.server.app import create_app
    from tokenmill.server.auth import check_bind
    from tokenmill.server.embedded import Background

    settings = settings_from(ctx)
    check_bind(host, settings.api_keys + settings.admin_keys)
    # Read once; local workers inherit the environment and need none of these secrets.
    for name in ("TOKENMILL_API_KEYS", "TOKENMILL_ADMIN_KEYS", "TOKENMILL_WEBHOOKS"):
        os.environ.pop(name, None)
    store = open_store(settings)
    embedded = settings.embedded
    background = Background(store, settings, embedded=embedded, idle_seconds=idle_stop, workers=workers)
    app = create_app(settings, store, background)
    mode = "embedded: dispatcher and local workers in this process" if embedded else "API only (fleet)"
    console.print(f"tokenmill serve on http://{host}:{port}/v1 — {mode}; store {store.masked_url}")
    logging.getLogger("uvicorn.access").disabled = True  # paths only, but keep the log to what matters
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5)

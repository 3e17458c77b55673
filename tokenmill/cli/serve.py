"""`tokenmill serve`: the OpenAI-compatible Files + Batches API (and the dashboard) over the store."""

from __future__ import annotations

import logging
import os
from typing import Annotated

import typer

from tokenmill.cli.common import console, open_store, settings_from
from tokenmill.config import install_masking, split_list

UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


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
    models: Annotated[
        str | None,
        typer.Option(
            help="Catalog models a batch may name, comma-separated ('*': any, fetched on demand). "
            "Default: embedded, the models already in the models folder; API-only, any"
        ),
    ] = None,
) -> None:
    """Serve the OpenAI Files + Batches API; with no database/broker configured, also run the work.

    Example: TOKENMILL_API_KEYS=sk-team-a tokenmill serve --host 127.0.0.1 --port 8080
    """
    import uvicorn

    from tokenmill.server.app import create_app
    from tokenmill.server.auth import check_bind
    from tokenmill.server.embedded import Background
    from tokenmill.server.served_models import served_models

    settings = settings_from(ctx)
    if models is not None:
        settings = settings.with_(serve_models=split_list(models) or ("",))
    served = served_models(settings)  # a typo in the list fails here, not on every batch
    check_bind(host, settings.api_keys + settings.admin_keys)
    for name in ("TOKENMILL_API_KEYS", "TOKENMILL_ADMIN_KEYS"):  # read once; local workers inherit the environment
        os.environ.pop(name, None)
    store = open_store(settings)
    embedded = settings.embedded
    background = Background(store, settings, embedded=embedded, idle_seconds=idle_stop, workers=workers)
    app = create_app(settings, store, background)
    mode = "embedded: dispatcher and local workers in this process" if embedded else "API only (fleet)"
    console.print(f"tokenmill serve on http://{host}:{port}/v1 — {mode}; store {store.masked_url}")
    console.print("models: any catalog model" if served is None else f"models: {', '.join(served.names()) or 'none'}")
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)  # fmt: skip
    logging.getLogger("uvicorn.access").disabled = True  # paths only, but keep the log to what matters
    install_masking(*UVICORN_LOGGERS)  # uvicorn's handlers exist once its config is made, and bypass the root's
    uvicorn.Server(config).run()

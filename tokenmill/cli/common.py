"""What every command shares: settings from the environment (the edge), the store, the console."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler

from tokenmill.config import Settings
from tokenmill.store import Store

console = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)


def settings_from(ctx: typer.Context) -> Settings:
    return ctx.obj if isinstance(ctx.obj, Settings) else Settings.from_env()


def open_store(settings: Settings, migrate: bool = True) -> Store:
    """Connect (and migrate) with backoff; an unreachable store becomes one clean line with a masked URL."""
    store = Store(settings.database_url)
    if migrate:
        store.retrying(store.migrate, attempts=3)
    else:
        store.retrying(store.ping, attempts=3)
    return store


def setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING
    logging.basicConfig(
        level=level, format="%(message)s", handlers=[RichHandler(console=console, show_path=False)], force=True
    )
    for noisy in ("celery", "kombu", "amqp"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def default_output(path: Path, suffix: str) -> Path:
    name = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.stem
    return path.with_name(f"{name}.{suffix}.jsonl")

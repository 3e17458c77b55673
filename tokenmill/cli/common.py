"""What every command shares: settings from the environment (the edge), the store, the console."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler

from tokenmill.config import Settings, install_masking
from tokenmill.store import Store
from tokenmill.store import schedulers as store_schedulers

# Markup and emoji codes off by default: what commands print is mostly data (paths, job names, worker
# errors, model references), and a "[/x]" in it would raise MarkupError; styling is asked for explicitly
# (markup=True) on a literal the code controls.
console = Console(stderr=True, highlight=False, markup=False, emoji=False)
out = Console(highlight=False, soft_wrap=True, markup=False, emoji=False)


def print_plain(text: str) -> None:
    """Machine-readable output (JSON, ids, paths) verbatim: rich markup would eat a ``[draft]`` in a
    job name or a path, and a stray ``[/x]`` would raise MarkupError instead of printing."""
    out.print(text, markup=False, emoji=False, highlight=False)


def settings_from(ctx: typer.Context) -> Settings:
    return ctx.obj if isinstance(ctx.obj, Settings) else Settings.from_env()


def open_store(settings: Settings) -> Store:
    """Connect and bring the schema to head (a no-op when it is), with backoff.

    Every command migrates, so `tokenmill workers` against a brand-new database shows an empty fleet
    instead of a missing-table error; an unreachable store becomes one clean line with a masked URL.
    """
    store = Store(settings.database_url)
    store.retrying(store.migrate, attempts=3)
    return store


def setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING
    handler = RichHandler(console=console, show_path=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    install_masking()  # every log line and traceback, whoever wrote it, with credentials and row values masked
    for noisy in ("celery", "kombu", "amqp"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def default_output(path: Path, suffix: str) -> Path:
    name = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.stem
    return path.with_name(f"{name}.{suffix}.jsonl")


def scheduler_state(store: Store, lost_after: float) -> str:
    """One phrase for the dispatch loops the store has seen: whether anyone is sending chunks, and why not."""
    with store.session() as s:
        seen = store_schedulers.health(s, lost_after)
    alive = [h for h in seen if h.alive]
    if not alive:
        return "none running (jobs on a fleet wait for `tokenmill scheduler`)" if not seen else "lost (no heartbeat)"
    failing = [h for h in alive if h.failing_for is not None]
    if len(failing) < len(alive):
        return "ok"
    worst = max(failing, key=lambda h: h.failing_for or 0.0)
    return f"failing for {worst.failing_for or 0.0:.0f}s on {worst.host}: {worst.error}"

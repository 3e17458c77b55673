"""Entry point: the typer app and the one place errors become clean one-line messages."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from tokenmill import __version__
from tokenmill.cli import fleet, jobs, models, report, run, serve
from tokenmill.cli.common import console, setup_logging
from tokenmill.config import Settings, mask_text
from tokenmill.errors import ConfigError, TokenmillError

app = typer.Typer(
    name="tokenmill",
    help="Run JSONL prompt datasets through local quantized LLMs on one machine or a fleet.\n\n"
    "Example: tokenmill run docs.jsonl --model smollm2-135m-instruct",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    ctx: typer.Context,
    data_dir: Annotated[
        Path | None, typer.Option(help="Embedded store and broker folder [env: TOKENMILL_DATA_DIR]")
    ] = None,
    database_url: Annotated[
        str | None, typer.Option(help="SQL store URL [env: TOKENMILL_DATABASE_URL]", show_default=False)
    ] = None,
    broker_url: Annotated[
        str | None, typer.Option(help="Celery broker URL [env: TOKENMILL_BROKER_URL]", show_default=False)
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what happens")] = False,
) -> None:
    setup_logging(verbose)
    ctx.obj = Settings.from_env(data_dir=data_dir, database_url=database_url, broker_url=broker_url)


@app.command("version")
def version() -> None:
    """Print tokenmill's version. Example: tokenmill version"""
    typer.echo(__version__)


# Each command module defines its commands as top-level functions and adds them to the app in its
# register(); the order here is the order of `tokenmill --help`.
run.register(app)
jobs.register(app)
fleet.register(app)
report.register(app)
models.register(app)
app.command("serve")(serve.serve)


def one_line(message: str) -> str:
    """An error as exactly one line for stderr: URL passwords masked, newlines folded, rich markup escaped
    (a file named ``data[x].jsonl`` must not be read as a style, nor break the message)."""
    return escape(" ".join(mask_text(message).split()))


def _click_errors() -> tuple[type[Exception], ...]:
    """Usage errors (unknown option, ``--chunk-size 0``): typer >= 0.2x raises its vendored copy of click's
    ClickException (``typer._click``), which is not ``click.ClickException``; both must print one usage line,
    not a traceback."""
    import click

    found: list[type[Exception]] = [click.ClickException]
    try:
        from typer._click.exceptions import ClickException as VendoredClickException
    except ImportError:  # a typer that uses the click package itself
        pass
    else:
        found.append(VendoredClickException)
    return tuple(found)


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except TokenmillError as exc:
        # soft_wrap: never folded at the terminal width (80 columns when stderr is a file or a pipe).
        # stderr may be a log file on the very disk that is full: the exit code must still say why.
        with contextlib.suppress(OSError):
            console.print(f"[red]error:[/red] {one_line(str(exc))}", markup=True, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        console.print("aborted")
        sys.exit(130)
    except Exception as exc:
        if isinstance(exc, _click_errors()):
            exc.show()  # type: ignore[attr-defined]
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        raise
    # Without standalone mode, click hands back `raise typer.Exit(code)` as a return value (worker exit codes).
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["ConfigError", "app", "main"]

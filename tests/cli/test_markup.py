"""Data printed by a command (paths, worker errors, model names) reaches the terminal verbatim: rich
markup and emoji codes in it are text, never styles (a ``[/x]`` would otherwise raise MarkupError)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from tokenmill.cli.app import app
from tokenmill.config import Settings
from tokenmill.store import Store
from tokenmill.store import workers as store_workers

runner = CliRunner()
ODD = "[bold]CUDA[/bold] error [/oops] :warning: in data[1]"


def test_a_worker_error_is_shown_as_written(settings: Settings, store: Store) -> None:
    with store.session() as s:
        store_workers.register(s, id="h:1:a", name="h", host="h", pid=1, state="failed", error=ODD,
                               family="f", capacity={}, queues=["tm.f"])  # fmt: skip
    env = {"TOKENMILL_DATABASE_URL": store.url, "COLUMNS": "400"}
    result = runner.invoke(app, ["workers", "--all"], env=env)
    assert result.exit_code == 0, result.output
    assert f"failed: {ODD}" in result.stdout


def test_a_store_path_is_echoed_as_written(tmp_path: Path) -> None:
    data_dir = tmp_path / "[red]runs[/red] :warning:"
    result = runner.invoke(app, ["--data-dir", str(data_dir), "migrate"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "[red]runs[/red] :warning:" in result.stderr and "is at the latest schema" in result.stderr

"""LocalFleet.stop on plain child processes: which signal each gets and which pids it reports killed."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import typer

from tokenmill.cli.app import app
from tokenmill.config import Settings
from tokenmill.workers.local import LocalFleet, worker_args, worker_command

# The parent waits for "ready" so each child's SIGTERM handler is in place before it is signalled.
READY = "print('ready', flush=True); import time; time.sleep(60)"
POLITE = "import signal, sys; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); " + READY
STUBBORN = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " + READY


def fleet_of(settings: Settings, *scripts: str) -> LocalFleet:
    fleet = LocalFleet(settings, "unused", len(scripts), 1)
    for script in scripts:
        p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        p.stdout.close()
        fleet.procs.append(p)
    return fleet


def test_grace_lets_polite_workers_exit_and_kills_the_rest(settings: Settings) -> None:
    fleet = fleet_of(settings, POLITE, STUBBORN)
    polite, stubborn = fleet.procs
    assert fleet.stop(grace=2.0) == [stubborn.pid]
    assert polite.returncode == 0
    assert stubborn.returncode == -signal.SIGKILL
    assert fleet.alive() == 0


def test_zero_grace_kills_everyone_without_asking(settings: Settings) -> None:
    fleet = fleet_of(settings, POLITE, POLITE)
    assert sorted(fleet.stop(grace=0)) == sorted(p.pid for p in fleet.procs)
    assert [p.returncode for p in fleet.procs] == [-signal.SIGKILL, -signal.SIGKILL]


def test_already_exited_workers_are_not_reported_killed(settings: Settings) -> None:
    fleet = fleet_of(settings, "print('ready', flush=True)")
    fleet.procs[0].wait(timeout=10)
    assert fleet.stop(grace=0) == []


WORKER_DEFAULTS = {"model": "smollm2-135m-instruct", "concurrency": 1, "threads": None, "gpu": None, "n_seq": None,
                   "n_ctx": 2048, "metrics_port": None, "name": None, "share": 1}  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, {"model": "m"}),
        ({"gpu": True}, {"model": "m", "gpu": True}),
        (
            {"n_ctx": 4096, "gpu": False, "n_seq": 3, "name": "local1", "threads": 2, "share": 4},
            {"model": "m", "n_ctx": 4096, "gpu": False, "n_seq": 3, "name": "local1", "threads": 2, "share": 4},
        ),
    ],
)
def test_worker_args_are_what_the_worker_command_parses(kwargs: dict[str, object], expected: dict[str, object]) -> None:
    """`run`'s local fleet and `worker --concurrency N` start children from worker_args; each option it
    writes must reach the child's `tokenmill worker` as the value given (a renamed option fails here)."""
    argv = worker_command(worker_args("m", **kwargs))  # type: ignore[arg-type]
    assert argv[:4] == [sys.executable, "-m", "tokenmill.cli", "worker"]
    worker = typer.main.get_command(app).commands["worker"]  # type: ignore[attr-defined]
    assert worker.make_context("worker", argv[4:]).params == {**WORKER_DEFAULTS, **expected}

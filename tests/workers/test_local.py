"""LocalFleet on plain child processes: how it starts them (argv, env) and how it stops them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
import typer

from tokenmill.cli.app import app
from tokenmill.cli.options import PreferChoice
from tokenmill.config import Settings
from tokenmill.workers import local
from tokenmill.workers.local import LocalFleet, worker_argv

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


def test_local_workers_get_the_parents_engine_and_settings(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run`'s local fleet starts each child with the one argv builder: --engine from Settings.engine."""
    started: list[tuple[list[str], dict[str, str]]] = []
    real_popen = subprocess.Popen

    def record(args: list[str], *, env: dict[str, str], **kw: Any) -> subprocess.Popen[bytes]:
        started.append((args, env))
        return real_popen([sys.executable, "-c", "pass"], env=env, **kw)  # a real child, not a worker

    monkeypatch.setattr(local.subprocess, "Popen", record)
    child_settings = settings.with_(engine="stub", data_dir=tmp_path / "tm")
    fleet = LocalFleet(child_settings, "smollm2-135m-instruct", 2, 3, n_seq=4)
    fleet.start()
    fleet.stop(grace=5.0)
    assert [args for args, _ in started] == [
        worker_argv(model="smollm2-135m-instruct", engine="stub", share=2, threads=3, name=f"local{i}", n_seq=4)
        for i in range(2)
    ]
    args = started[0][0]
    assert args[:4] == [sys.executable, "-m", "tokenmill.cli", "worker"]
    flags = dict(zip(args[4::2], args[5::2], strict=True))
    assert flags == {
        "--model": "smollm2-135m-instruct", "--engine": "stub", "--concurrency": "1", "--share": "2",
        "--threads": "3", "--name": "local0", "--n-seq": "4",
    }  # fmt: skip
    env = started[0][1]
    assert env["TOKENMILL_ENGINE"] == "stub" and env["TOKENMILL_DATABASE_URL"] == child_settings.database_url
    assert env[local.PARENT_PID_ENV] == str(os.getpid())
    assert local.SCHEMA_READY_ENV not in env  # a child of a parent that did not migrate migrates itself

    started.clear()
    migrated = LocalFleet(child_settings, "smollm2-135m-instruct", 1, 1, schema_ready=True)
    migrated.start()
    migrated.stop(grace=5.0)
    assert started[0][1][local.SCHEMA_READY_ENV] == "1"


def test_supervised_children_get_every_option_once() -> None:
    argv = worker_argv(model="m", engine="llama", share=3, n_ctx=512, gpu=False, metrics_port=9100)
    assert argv[4:] == [
        "--model", "m", "--engine", "llama", "--concurrency", "1", "--share", "3",
        "--n-ctx", "512", "--metrics-port", "9100", "--cpu",
    ]  # fmt: skip


WORKER_DEFAULTS = {"model": "smollm2-135m-instruct", "concurrency": 1, "threads": None, "gpu": None, "n_seq": None,
                   "n_ctx": 2048, "metrics_port": None, "metrics_host": "127.0.0.1", "name": None, "share": 1,
                   "engine": None, "prefer": PreferChoice.balanced}  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"share": 1}, {}),
        ({"share": 1, "gpu": True}, {"gpu": True}),
        ({"share": 1, "prefer": "speed"}, {"prefer": PreferChoice.speed}),
        (
            {"n_ctx": 4096, "gpu": False, "n_seq": 3, "name": "local1", "threads": 2, "share": 4, "metrics_port": 9,
             "metrics_host": "0.0.0.0"},
            {"n_ctx": 4096, "gpu": False, "n_seq": 3, "name": "local1", "threads": 2, "share": 4, "metrics_port": 9,
             "metrics_host": "0.0.0.0"},
        ),
    ],
)
def test_worker_args_are_what_the_worker_command_parses(kwargs: dict[str, object], expected: dict[str, object]) -> None:
    """`run`'s local fleet and `worker --concurrency N` start children from worker_argv; each option it
    writes must reach the child's `tokenmill worker` as the value given (a renamed option fails here)."""
    argv = worker_argv(model="m", engine="stub", **kwargs)  # type: ignore[arg-type]
    assert argv[:4] == [sys.executable, "-m", "tokenmill.cli", "worker"]
    worker = typer.main.get_command(app).commands["worker"]  # type: ignore[attr-defined]
    assert worker.make_context("worker", argv[4:]).params == {**WORKER_DEFAULTS, "model": "m", "engine": "stub",
                                                              **expected}


def test_a_gpu_host_gets_one_worker_per_gpu_each_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local.psutil, "cpu_count", lambda logical=True: 16)
    assert local.default_worker_count() == (4, 4)  # CPU: ~4 cores a process
    assert local.default_worker_count(2) == (2, 8)  # GPUs: one process each, the cores split between them
    pins = ["GPU-a", "GPU-b"]
    assert [local.gpu_env(pins, i) for i in range(3)] == [
        {"CUDA_VISIBLE_DEVICES": "GPU-a"}, {"CUDA_VISIBLE_DEVICES": "GPU-b"}, {"CUDA_VISIBLE_DEVICES": "GPU-a"}
    ]  # fmt: skip
    assert local.gpu_env([], 0) == {}


# A child that does what a worker does before touching the store: wait on the gate, then report.
GATED = ("import sys; from tokenmill.workers.main import schema_gate_opened; "
         "print('ready', flush=True); sys.exit(0 if schema_gate_opened(30) else 3)")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("opened", [True, False])
def test_workers_started_before_the_migration_wait_for_the_schema_gate(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch, opened: bool
) -> None:
    """`run` starts its workers before it migrates: they go on only when told the schema is at head, and
    stop when the parent's start-up failed (the gate closed unopened) instead of using an unmigrated store."""
    real_popen = subprocess.Popen
    children: list[subprocess.Popen[bytes]] = []

    def gated(args: list[str], *, env: dict[str, str], **kw: Any) -> subprocess.Popen[bytes]:
        assert env[local.SCHEMA_READY_ENV] == "1" and env[local.SCHEMA_GATE_ENV].isdigit()
        kw["stdout"] = subprocess.PIPE
        children.append(real_popen([sys.executable, "-c", GATED], env=env, **kw))
        return children[-1]

    monkeypatch.setattr(local.subprocess, "Popen", gated)
    fleet = LocalFleet(settings.with_(data_dir=tmp_path / "tm"), "unused", 2, 1, schema_gate=True)
    fleet.start()
    for child in children:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        child.stdout.close()
    assert all(child.poll() is None for child in children)  # waiting: nothing has said the schema is there
    if opened:
        fleet.open_gate()
    else:
        fleet.close_gate(ready=False)  # what stop() does first: end of file on the gate
    assert [child.wait(timeout=30) for child in children] == ([0, 0] if opened else [3, 3])
    fleet.stop(grace=0)


def test_a_worker_without_a_gate_does_not_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenmill.workers.main import schema_gate_opened

    monkeypatch.delenv(local.SCHEMA_GATE_ENV, raising=False)
    assert schema_gate_opened(0.0)
    read, write = os.pipe()
    os.close(write)
    monkeypatch.setenv(local.SCHEMA_GATE_ENV, str(read))
    assert not schema_gate_opened(5.0)  # closed unopened


@pytest.mark.timeout(60)
def test_run_stops_its_early_workers_when_the_store_cannot_be_opened(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run` starts its workers before opening the store; an unreachable store stops them again."""
    from tokenmill.cli.run import _open_for
    from tokenmill.cli.startup import FleetStarter
    from tokenmill.errors import ServiceUnavailable
    from tokenmill.workers.selection import ModelSelection

    real_popen = subprocess.Popen
    children: list[subprocess.Popen[bytes]] = []

    def gated(args: list[str], *, env: dict[str, str], **kw: Any) -> subprocess.Popen[bytes]:
        children.append(real_popen([sys.executable, "-c", GATED], env=env, **{**kw, "stdout": subprocess.DEVNULL}))
        return children[-1]

    monkeypatch.setattr(local.subprocess, "Popen", gated)
    dead = settings.with_(database_url="postgresql://nobody@127.0.0.1:1/nothing", data_dir=tmp_path / "tm")
    fleet = LocalFleet(dead, "unused", 1, 1, schema_gate=True)
    starter = FleetStarter(lambda: cast(ModelSelection, object()), fleet)  # no model: the children only wait
    starter.start()
    starter.wait()
    with pytest.raises(ServiceUnavailable):
        _open_for(starter, dead)
    assert children and all(child.poll() is not None for child in children)  # stopped, not left waiting

"""Local worker processes for `tokenmill run`: real, separate `tokenmill worker` processes on this host."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import psutil

from tokenmill.config import Settings

# Set by a parent that starts workers (`run`, `worker --concurrency N`): the worker stops when it dies.
PARENT_PID_ENV = "TOKENMILL_PARENT_PID"
# Set by a parent that brings the store's schema to head for its workers (`run`): they skip the migration
# (and importing Alembic) on their way to the first chunk.
SCHEMA_READY_ENV = "TOKENMILL_SCHEMA_READY"
# With it, when the parent starts its workers before migrating (`run` starts them first, so their imports
# and model load overlap its own start-up): the number of a pipe's read end. The parent writes a byte per
# worker once the schema is at head; end of file means it never will, and the worker exits.
SCHEMA_GATE_ENV = "TOKENMILL_SCHEMA_GATE"


def worker_argv(
    *,
    model: str,
    engine: str,
    share: int,
    threads: int | None = None,
    name: str | None = None,
    n_seq: int | None = None,
    n_ctx: int | None = None,
    gpu: bool | None = None,
    metrics_port: int | None = None,
    metrics_host: str | None = None,
    prefer: str | None = None,
) -> list[str]:
    """The command line of one single-process `tokenmill worker` that a parent starts on this host.

    Both parents (`run`'s local fleet and `worker --concurrency N`) build their children here, so a new
    worker option reaches both; ``share`` tells the child how many processes split the host's cores.
    """
    args = [sys.executable, "-m", "tokenmill.cli", "worker", "--model", model, "--engine", engine]
    args += ["--concurrency", "1", "--share", str(share)]
    optional = {"--threads": threads, "--name": name, "--n-seq": n_seq, "--n-ctx": n_ctx}
    optional["--metrics-port"] = metrics_port
    optional["--metrics-host"] = metrics_host if metrics_port else None
    optional["--prefer"] = prefer
    for flag, value in optional.items():
        if value:
            args += [flag, str(value)]
    if gpu is not None:
        args.append("--gpu" if gpu else "--cpu")
    return args


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    """A child worker's environment: ours, the parent's settings (flags included), and the parent's pid."""
    return {**os.environ, **settings.as_env(), **extra, "PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid())}


def default_worker_count(gpus: int = 0) -> tuple[int, int]:
    """(processes, threads each): on a CPU host, batched decoding wants whole cores per process, ~4 per
    process; on a host whose llama.cpp can use its ``gpus``, one process per GPU (a second process on the
    same GPU would size its model against VRAM the first already holds)."""
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    processes = gpus if gpus > 0 else max(1, cores // 4)
    return processes, max(1, cores // processes)


def gpu_env(pins: Sequence[str], i: int) -> dict[str, str]:
    """Child ``i``'s pin to one GPU (round-robin over ``pins``, the GPUs' :attr:`GpuInfo.cuda_id`); none
    without GPUs. A pinned child sees one GPU, so llama.cpp cannot spread its layers over the others."""
    return {"CUDA_VISIBLE_DEVICES": pins[i % len(pins)]} if pins else {}


class LocalFleet:
    def __init__(
        self,
        settings: Settings,
        model: str,
        count: int,
        threads_each: int,
        n_seq: int | None = None,
        extra_env: dict[str, str] | None = None,
        prefer: str | None = None,
        *,
        schema_ready: bool = False,
        schema_gate: bool = False,
        n_ctx: int | None = None,
        gpu_pins: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.model = model
        self.count = count
        self.threads_each = threads_each
        self.n_seq = n_seq
        self.n_ctx = n_ctx  # context per sequence; None: the worker's default
        self.prefer = prefer
        self.extra_env = {**({SCHEMA_READY_ENV: "1"} if schema_ready or schema_gate else {}), **(extra_env or {})}
        self.gpu_pins = tuple(gpu_pins)
        self.schema_gate = schema_gate
        self._gate: int | None = None  # the write end of the schema gate until it opens
        self.procs: list[subprocess.Popen[bytes]] = []
        self.spawned_at: float | None = None  # when the first worker process was started
        self._logs: list[IO[bytes]] = []
        self.log_dir = Path(settings.data_dir) / "logs"

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        gate: dict[str, str] = {}
        gate_read = None
        if self.schema_gate:
            gate_read, self._gate = os.pipe()
            gate[SCHEMA_GATE_ENV] = str(gate_read)
        self.spawned_at = time.time()
        for i in range(self.count):
            env = {**child_env(self.settings, **self.extra_env, **gpu_env(self.gpu_pins, i)), **gate}
            args = worker_argv(
                model=self.model, engine=self.settings.engine, share=self.count, threads=self.threads_each,
                name=f"local{i}", n_seq=self.n_seq, n_ctx=self.n_ctx, prefer=self.prefer,
            )  # fmt: skip
            log = open(self.log_dir / f"worker-{i}.log", "ab")  # noqa: SIM115
            self._logs.append(log)
            # Own process group: a Ctrl-C in the terminal reaches `run`, which stops workers in order.
            self.procs.append(
                subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                 pass_fds=(gate_read,) if gate_read is not None else ())
            )
        if gate_read is not None:
            os.close(gate_read)

    def open_gate(self) -> None:
        """The store's schema is at head: let the workers started before it was (``schema_gate``) go on."""
        self.close_gate(ready=True)

    def close_gate(self, *, ready: bool) -> None:
        """Tell the workers waiting on the gate whether the schema is ready (once); unready, they exit."""
        if self._gate is not None:
            if ready:
                os.write(self._gate, b"1" * max(1, len(self.procs)))
            os.close(self._gate)
            self._gate = None

    def alive(self) -> int:
        return sum(1 for p in self.procs if p.poll() is None)

    def exit_codes(self) -> list[int]:
        """The exit codes of the workers that have exited (6: the store's disk is full)."""
        return [code for p in self.procs if (code := p.poll()) is not None]

    def stop(self, grace: float = 15.0) -> list[int]:
        """SIGTERM, then SIGKILL whoever is still up after ``grace`` seconds; returns the killed pids.

        ``grace=0`` kills at once. Killing is safe at any point (leases and the unique result constraint
        see to that); an idle Celery worker's warm shutdown takes seconds, which `tokenmill run` need
        not wait for once its job is done.
        """
        self.close_gate(ready=False)  # if never opened: the workers waiting on it read end of file and exit
        running = [p for p in self.procs if p.poll() is None]
        if grace > 0:
            for p in running:
                p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for p in running:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=max(0.05, deadline - time.monotonic()))
        killed: list[int] = []
        for p in running:
            if p.poll() is None:
                p.kill()
                p.wait()
                killed.append(p.pid)
        for log in self._logs:
            log.close()
        return killed

"""Local worker processes for `tokenmill run`: real, separate `tokenmill worker` processes on this host."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import psutil

from tokenmill.config import Settings

# Set by a parent that starts workers (`run`, `worker --concurrency N`): the worker stops when it dies.
PARENT_PID_ENV = "TOKENMILL_PARENT_PID"


def default_worker_count() -> tuple[int, int]:
    """(processes, threads each): batched decoding wants whole cores per process, ~4 per process."""
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    processes = max(1, cores // 4)
    return processes, max(1, cores // processes)


def worker_args(
    model: str,
    *,
    n_ctx: int | None = None,
    gpu: bool | None = None,
    n_seq: int | None = None,
    name: str | None = None,
    threads: int | None = None,
    share: int | None = None,
) -> list[str]:
    """The `tokenmill worker` options for one child worker process. `run`'s local fleet and
    `worker --concurrency N` both start children from this, so an option a child needs is passed on in
    one place; None (or 0) leaves the worker's own default."""
    args = ["--model", model]
    if n_ctx:
        args += ["--n-ctx", str(n_ctx)]
    if gpu is not None:
        args.append("--gpu" if gpu else "--cpu")
    if n_seq:
        args += ["--n-seq", str(n_seq)]
    if name:
        args += ["--name", name]
    if threads:
        args += ["--threads", str(threads)]
    if share:
        args += ["--share", str(share)]
    return args


def worker_command(args: list[str]) -> list[str]:
    """The command line of one single-process `tokenmill worker` with ``args`` (see worker_args)."""
    return [sys.executable, "-m", "tokenmill.cli", "worker", *args, "--concurrency", "1"]


class LocalFleet:
    def __init__(
        self,
        settings: Settings,
        model: str,
        count: int,
        threads_each: int,
        n_seq: int | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.model = model
        self.count = count
        self.threads_each = threads_each
        self.n_seq = n_seq
        self.extra_env = extra_env or {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        self.log_dir = Path(settings.data_dir) / "logs"

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ, **self.settings.as_env(), **self.extra_env,
            "PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid()),
        }  # fmt: skip
        for i in range(self.count):
            args = worker_command(
                worker_args(self.model, n_seq=self.n_seq, name=f"local{i}", threads=self.threads_each, share=self.count)
            )
            log = open(self.log_dir / f"worker-{i}.log", "ab")  # noqa: SIM115
            self._logs.append(log)
            # Own process group: a Ctrl-C in the terminal reaches `run`, which stops workers in order.
            self.procs.append(
                subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )

    def alive(self) -> int:
        return sum(1 for p in self.procs if p.poll() is None)

    def stop(self, grace: float = 15.0) -> list[int]:
        """SIGTERM, then SIGKILL whoever is still up after ``grace`` seconds; returns the killed pids.

        ``grace=0`` kills at once. Killing is safe at any point (leases and the unique result constraint
        see to that); an idle Celery worker's warm shutdown takes seconds, which `tokenmill run` need
        not wait for once its job is done.
        """
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

"""A small harness for the reliability scenarios: a real store, a real broker, real `tokenmill` processes.

Every scenario asserts by counting rows in the store (``expected, stored, duplicated``); :class:`Stack`
is what starts the processes (through the shared ``procs`` fixture, so teardown kills whole process
groups) and what reads the store.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy import text

from tests.conftest import STUB_ARGS, STUB_ENV, Procs, run_cli
from tokenmill.config import Settings
from tokenmill.store import Store

WORKER_BASE_ENV = {"HF_HUB_OFFLINE": "1"}
MODEL = "smollm2-135m-instruct"
QUEUE = f"tm.{MODEL}+stub"  # the stub workers' queue: the engine is part of a model's identity


def wait_for(predicate: Callable[[], object], timeout: float, what: str, logs: Callable[[], str] | None = None) -> Any:
    """Poll until ``predicate()`` is truthy; its value is returned. On timeout, fail with the process logs."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}" + (f"\n{logs()}" if logs else ""))
        time.sleep(0.2)


def write_dataset(path: Path, n: int, *, max_tokens: int = 4, prompt: Callable[[int], str] | None = None) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            content = prompt(i) if prompt else f"Give one word for {i}."
            # temperature > 0: never answered from the result cache, every row is really generated
            row = {"id": f"r{i}", "prompt": content, "max_tokens": max_tokens, "temperature": 0.5}
            fh.write(json.dumps(row) + "\n")
    return path


@dataclass
class Counts:
    """What the store holds for a job: ``expected`` rows, results ``stored``, and rows stored twice."""

    expected: int
    stored: int
    distinct: int

    @property
    def duplicated(self) -> int:
        return self.stored - self.distinct

    def __str__(self) -> str:
        return f"expected={self.expected} stored={self.stored} duplicated={self.duplicated}"


class Stack:
    """One deployment under test: settings (store + broker URLs) and the processes started on them."""

    def __init__(self, settings: Settings, procs: Procs, tmp: Path) -> None:
        self.settings = settings
        self.procs = procs
        self.tmp = tmp
        self.store = Store(settings.database_url)
        self.store.retrying(self.store.migrate)
        self.gen_log = tmp / "generated.log"
        self._workers = 0
        self.adopted: list[int] = []  # processes the test started indirectly (local workers of `run`)

    # --- processes -----------------------------------------------------------------------------------

    def worker_env(self, delay: float = 0.05, **extra: str) -> dict[str, str]:
        return {
            **STUB_ENV,
            **WORKER_BASE_ENV,
            "TOKENMILL_STUB_DELAY": str(delay),
            "TOKENMILL_STUB_LOG": str(self.gen_log),
            **extra,
        }

    def worker(
        self,
        *args: str,
        name: str | None = None,
        env: dict[str, str] | None = None,
        stub: bool = True,
        model: str = MODEL,
    ) -> subprocess.Popen[bytes]:
        """`tokenmill worker` (the stub engine unless ``stub=False``); ``env`` adds to the worker's environment."""
        self._workers += 1
        name = name or f"w{self._workers}"
        full_env = {**(self.worker_env() if stub else WORKER_BASE_ENV), **(env or {})}
        engine = STUB_ARGS if stub else ()
        return self.procs.start(
            self.settings, "worker", "--model", model, *engine, "--threads", "1", "--name", name, *args,
            env=full_env, name=name,
        )  # fmt: skip

    def scheduler(self) -> subprocess.Popen[bytes]:
        return self.procs.start(self.settings, "scheduler", name="scheduler")

    def cli(
        self, *args: str, timeout: float = 120, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run_cli(self.settings, *args, timeout=timeout, env=env, cwd=self.tmp)

    def submit(self, path: Path, *args: str, model: str = MODEL, stub: bool = True) -> str:
        """`tokenmill submit` for the stub workers (the engine is part of the job's queue) unless ``stub=False``."""
        proc = self.cli("submit", str(path), "--model", model, *args, env=STUB_ENV if stub else None)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().splitlines()[-1]

    def logs(self) -> str:
        return self.procs.logs()

    # --- the store -----------------------------------------------------------------------------------

    def query(self, sql: str, **params: object) -> list[Any]:
        def run() -> list[Any]:
            with self.store.session() as s:
                return list(s.execute(text(sql), params).all())

        return self.store.retrying(run)

    def counts(self, job: str) -> Counts:
        (total,) = self.query("SELECT total_rows FROM jobs WHERE id = :j", j=job)[0]
        stored, distinct = self.query("SELECT count(*), count(distinct seq) FROM results WHERE job_id = :j", j=job)[0]
        return Counts(int(total), int(stored), int(distinct))

    def results(self, job: str) -> int:
        return int(self.query("SELECT count(*) FROM results WHERE job_id = :j", j=job)[0][0])

    def state(self, job: str) -> str:
        return str(self.query("SELECT state FROM jobs WHERE id = :j", j=job)[0][0])

    def chunk_states(self, job: str) -> Counter[str]:
        return Counter(
            {
                s: int(n)
                for s, n in self.query("SELECT state, count(*) FROM chunks WHERE job_id = :j GROUP BY state", j=job)
            }
        )

    def wait_state(self, job: str, states: tuple[str, ...] = ("completed",), timeout: float = 60) -> str:
        wait_for(lambda: self.state(job) in states, timeout, f"job {job} to reach {states}", self.logs)
        return self.state(job)

    def wait_results(self, job: str, at_least: int, timeout: float = 60) -> int:
        return int(
            wait_for(
                lambda: self.results(job) >= at_least and self.results(job),
                timeout,
                f"{at_least} results of job {job}",
                self.logs,
            )
        )

    def running_chunk_of(self, worker_name: str, min_done: int = 0) -> tuple[int, int] | None:
        """(chunk id, rows of it already stored) of a chunk the named worker holds a lease on, with at least
        ``min_done`` of its rows stored: a kill then lands in the middle of a chunk."""
        rows = self.query(
            "SELECT c.id, (SELECT count(*) FROM results r WHERE r.job_id = c.job_id"
            " AND r.seq BETWEEN c.first_seq AND c.last_seq) FROM chunks c JOIN workers w ON c.lease_owner = w.id"
            " WHERE c.state = 'running' AND w.name = :n",
            n=worker_name,
        )
        return next(((int(i), int(done)) for i, done in rows if done >= min_done), None)

    def generations(self) -> Counter[str]:
        """How many times the stub engine generated each custom_id (successful attempts), over all workers."""
        if not self.gen_log.exists():
            return Counter()
        return Counter(
            parts[1]
            for parts in (line.split() for line in self.gen_log.read_text().splitlines())
            if len(parts) == 3 and parts[2] == "generated"
        )

    def stored_by(self, job: str, worker_name: str) -> set[str]:
        """custom_ids of the job's results that the named worker (or its ``--concurrency`` children) stored."""
        rows = self.query(
            "SELECT r.custom_id FROM results r JOIN workers w ON r.worker_id = w.id"
            " WHERE r.job_id = :j AND (w.name = :n OR w.name LIKE :children)",
            j=job, n=worker_name, children=f"{worker_name}-%",
        )  # fmt: skip
        return {str(cid) for (cid,) in rows}

    def adopt(self, pids: list[int]) -> None:
        """Kill these (indirectly started) processes at teardown if they are still around."""
        self.adopted.extend(pids)

    def close(self) -> None:
        for pid in self.adopted:
            try:
                proc = psutil.Process(pid)
                if "tokenmill" in " ".join(proc.cmdline()):
                    proc.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        self.store.dispose()


def kill9(proc: subprocess.Popen[bytes], *, group: bool = False) -> None:
    """SIGKILL a process (or its whole process group) and reap it."""
    if group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture
def fleet(settings: Settings, pg_url: str, redis_url: str, procs: Procs, tmp_path: Path) -> Iterator[Stack]:
    """Redis broker + Postgres store: the fleet deployment."""
    stack = Stack(settings.with_(database_url=pg_url, broker_url=redis_url), procs, tmp_path)
    yield stack
    procs.stop_all()
    stack.close()


@pytest.fixture
def embedded(settings: Settings, procs: Procs, tmp_path: Path) -> Iterator[Stack]:
    """Embedded SQLite store + kombu SQLAlchemy broker on SQLite: the one-machine deployment."""
    stack = Stack(settings, procs, tmp_path)
    yield stack
    procs.stop_all()
    stack.close()

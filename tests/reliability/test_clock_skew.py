"""Workers and a scheduler whose clocks are off by ±40 s and ±5 min, as real processes under libfaketime:
every row answered exactly once, no lease lost, no chunk claimed again.

Lease, heartbeat and expiry times are the database's clock (tokenmill/store/clock.py); a process that
compared one with its own clock would, 40 s ahead, see every live lease of a 6 s lease time as expired
and take it, and 40 s behind, look dead to the scheduler. Each process runs with libfaketime preloaded
(``FAKETIME=±N``), so ``time.time()``, ``datetime.now()`` and every C call of the process read the skewed
wall clock, while its monotonic clock stays true as on a real host (see skewclock/sitecustomize.py for
why libfaketime's default, which also moves the monotonic clock, hangs every timed wait of Python 3.11).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need, tokenmill_cmd
from tests.reliability.conftest import MODEL, Stack, kill9, wait_for, write_dataset

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
SHIM = Path(__file__).resolve().parent / "skewclock"
ROWS, CHUNK, DELAY = 32, 4, 0.3
RECOVERY = 90.0  # seconds from the kill; a lease judged on the scheduler's clock would wait 5 minutes more


def skewed_env(offset: str) -> dict[str, str]:
    """The environment that puts a process's wall clock ``offset`` (``+40s``, ``-5m``) off the true time."""
    need(shutil.which("faketime") is not None and LIBFAKETIME.exists(), "libfaketime (apt-get install faketime)")
    return {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME": offset,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_DONT_RESET": "1",
        "PYTHONPATH": os.pathsep.join([str(SHIM), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }


def clock_seen_by(stack: Stack, offset: str) -> float:
    """How far ahead of the database clock a process under ``offset`` reads ``time.time()`` (a sanity check)."""
    code = "import time; print(time.time())"
    env = {**os.environ, **skewed_env(offset)}
    faked = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout)
    return faked - float(stack.query("SELECT extract(epoch from statement_timestamp())")[0][0])


def start_fleet(stack: Stack, workers: tuple[str, ...], scheduler: str) -> tuple[str, list[subprocess.Popen[bytes]]]:
    """Submit the job (true clock), then a scheduler and one stub worker per offset, each on its own clock."""
    for offset in {*workers, scheduler}:
        seen, wanted = clock_seen_by(stack, offset), float(offset[:-1]) * (60 if offset.endswith("m") else 1)
        assert abs(seen - wanted) < 5, f"libfaketime did not skew the clock: {seen:+.1f}s, wanted {offset}"
    job = stack.submit(write_dataset(stack.tmp / "d.jsonl", ROWS), "--chunk-size", str(CHUNK))
    stack.procs.spawn(tokenmill_cmd("scheduler"), {**stack.settings.as_env(), **skewed_env(scheduler)}, "scheduler")
    started = []
    for i, offset in enumerate(workers):
        env = {**stack.settings.as_env(), **stack.worker_env(delay=DELAY), **skewed_env(offset)}
        argv = tokenmill_cmd("worker", "--model", MODEL, "--engine", "stub", "--threads", "1", "--name", f"w{i}")
        started.append(stack.procs.spawn(argv, env, f"w{i}{offset}"))
    return job, started


def outcome(stack: Stack, job: str) -> dict[str, Any]:
    counts = stack.counts(job)
    failed = stack.query("SELECT error_code, count(*) FROM results WHERE job_id = :j AND status = 'failed'"
                         " GROUP BY error_code", j=job)  # fmt: skip
    attempts = sorted(int(a) for (a,) in stack.query("SELECT attempts FROM chunks WHERE job_id = :j", j=job))
    by_worker = stack.query("SELECT w.name, count(*) FROM results r JOIN workers w ON r.worker_id = w.id"
                            " WHERE r.job_id = :j GROUP BY w.name", j=job)  # fmt: skip
    print(f"\n{counts}, failed {failed}, chunk attempts {attempts}, rows by worker {sorted(by_worker)}")
    return {"state": stack.state(job), "rows": (counts.expected, counts.stored, counts.duplicated), "failed": failed,
            "attempts": attempts}  # fmt: skip


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("workers", "scheduler"), [(("-40s", "+40s"), "+40s"), (("+5m", "-5m"), "+5m")], ids=["40s", "5min"]
)
def test_skewed_clocks_lose_no_row(fleet: Stack, workers: tuple[str, str], scheduler: str) -> None:
    """Workers off in opposite directions and a scheduler ahead: no lease is taken from its live owner."""
    job, _ = start_fleet(fleet, workers, scheduler)
    fleet.wait_state(job, ("completed", "completed_with_errors", "cancelled"), timeout=180)
    logs, seen, gens = fleet.logs(), outcome(fleet, job), fleet.generations()
    problems = {
        "job not completed": seen["state"] != "completed",
        "rows missing or duplicated": seen["rows"] != (ROWS, ROWS, 0),
        "rows failed": seen["failed"] != [],
        "a chunk claimed again": max(seen["attempts"]) != 1,
        "a lease lost": "lease lost" in logs or "no longer ours" in logs,
        "the scheduler took a lease back": "reopened" in logs,
        "a row generated twice": set(gens) != {f"r{i}" for i in range(ROWS)} or max(gens.values()) != 1,
    }
    assert not any(problems.values()), f"{[k for k, v in problems.items() if v]}\n{logs}"


@pytest.mark.timeout(240)
def test_a_scheduler_behind_reopens_the_chunk_of_a_dead_worker_ahead(fleet: Stack) -> None:
    """kill -9 of the worker 5 min ahead inside a chunk; the scheduler 5 min behind still sees its lease run
    out (and its heartbeat stop) within seconds, not ten minutes, and the other worker answers the rest."""
    job, (ahead, _) = start_fleet(fleet, ("+5m", "-5m"), "-5m")
    wait_for(lambda: fleet.running_chunk_of("w0", 1), 60, "the worker ahead inside a chunk", fleet.logs)
    kill9(ahead)
    killed = time.monotonic()
    fleet.wait_state(job, ("completed", "completed_with_errors", "cancelled"), timeout=RECOVERY)
    recovered = time.monotonic() - killed
    seen, logs = outcome(fleet, job), fleet.logs()
    assert (seen["state"], seen["rows"], seen["failed"]) == ("completed", (ROWS, ROWS, 0), []), logs
    assert max(seen["attempts"]) == 2 and "reopened" in logs, logs  # the dead worker's chunks, taken once more
    assert "lease lost" not in logs and "no longer ours" not in logs, logs
    print(f"recovered {recovered:.1f}s after the kill")

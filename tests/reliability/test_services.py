"""Redis and Postgres restarted in the middle of a job: everyone reconnects and every row lands once.

These tests restart the machine's shared Redis and Postgres, so they live in one module and pytest runs
them one after the other; each restores the service in a ``finally`` even when it fails. Redis runs
without persistence here (as in CI): a restart loses every queued message, and the scheduler's
:class:`~tokenmill.scheduler.dispatch.BrokerWatch` is what queues those chunks again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import IN_CI, need, port_open
from tests.reliability.conftest import Stack, wait_for, write_dataset

# Restarting a developer's own Redis and Postgres (the CI start command, root) is not something a plain
# `pytest` may do to a laptop: these run in CI, or where TOKENMILL_TEST_RESTART_SERVICES=1 says so.
RESTART_ALLOWED = IN_CI or os.environ.get("TOKENMILL_TEST_RESTART_SERVICES") == "1"
pytestmark = [
    pytest.mark.redis,
    pytest.mark.postgres,
    pytest.mark.slow,
    pytest.mark.skipif(
        not RESTART_ALLOWED, reason="restarts the local Redis and Postgres; set TOKENMILL_TEST_RESTART_SERVICES=1"
    ),
]

REDIS_START = [
    "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379", "--save", "",
    "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log",
]  # fmt: skip


def _redis_up() -> bool:
    return subprocess.run(["redis-cli", "ping"], capture_output=True, text=True).stdout.strip() == "PONG"


@contextlib.contextmanager
def redis_restarted(down_for: float = 2.0) -> Iterator[None]:
    """Stop Redis without saving (its data is gone), keep it down a moment, start it again."""
    subprocess.run(["redis-cli", "shutdown", "nosave"], capture_output=True, timeout=30)
    try:
        wait_for(lambda: not _redis_up(), 15, "Redis to stop")
        time.sleep(down_for)
    finally:
        if not _redis_up():
            subprocess.run(REDIS_START, check=True, timeout=30)
        wait_for(_redis_up, 30, "Redis to come back")
    yield


def _pg_cluster() -> str:
    versions = sorted(p.name for p in Path("/etc/postgresql").iterdir())
    return versions[-1]


def restart_postgres() -> None:
    try:
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", _pg_cluster(), "main", "restart"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    finally:
        wait_for(lambda: port_open("127.0.0.1", 5432), 60, "Postgres to come back")


def assert_nothing_half_written(stack: Stack, job: str) -> None:
    """Every result is whole, and every chunk marked done holds all of its rows."""
    broken = stack.query(
        "SELECT count(*) FROM results WHERE job_id = :j AND (status <> 'succeeded' OR body IS NULL"
        " OR completion_tokens < 1)", j=job)[0][0]  # fmt: skip
    short_chunks = stack.query(
        "SELECT count(*) FROM chunks c WHERE c.job_id = :j AND c.state = 'done' AND"
        " (SELECT count(*) FROM results r WHERE r.job_id = c.job_id AND r.seq BETWEEN c.first_seq AND c.last_seq)"
        " <> c.last_seq - c.first_seq + 1", j=job)[0][0]  # fmt: skip
    assert (broken, short_chunks) == (0, 0)


def _start(fleet: Stack, n: int) -> str:
    for tool in ("redis-cli", "redis-server", "pg_ctlcluster"):
        need(shutil.which(tool) is not None, f"{tool} (to restart the service)")
    job = fleet.submit(write_dataset(fleet.tmp / "d.jsonl", n), "--chunk-size", "10")
    fleet.scheduler()
    fleet.worker(env={"TOKENMILL_STUB_DELAY": "0.05"})
    fleet.worker(env={"TOKENMILL_STUB_DELAY": "0.05"})
    return job


def test_redis_restart_mid_job(fleet: Stack) -> None:
    n = 300
    job = _start(fleet, n)
    fleet.wait_results(job, 40)
    with redis_restarted():
        at_restart = fleet.results(job)
    restarted = time.monotonic()
    fleet.wait_state(job, timeout=90)
    took = time.monotonic() - restarted
    counts = fleet.counts(job)
    print(f"\nRedis restarted at {at_restart}/{n} rows: {counts}; job done {took:.1f}s after the restart")
    assert (counts.expected, counts.stored, counts.duplicated) == (n, n, 0)
    assert_nothing_half_written(fleet, job)
    # Recovery came from noticing the emptied broker, not from the minutes-long stale requeue.
    assert took < fleet.settings.requeue_after, fleet.logs()
    assert "lost its messages" in fleet.logs()


def test_postgres_restart_mid_job(fleet: Stack) -> None:
    n = 300
    job = _start(fleet, n)
    fleet.wait_results(job, 40)
    restart_postgres()
    at_restart = fleet.results(job)
    restarted = time.monotonic()
    fleet.wait_state(job, timeout=120)
    took = time.monotonic() - restarted
    counts = fleet.counts(job)
    print(f"\nPostgres restarted at {at_restart}/{n} rows: {counts}; job done {took:.1f}s after the restart")
    assert (counts.expected, counts.stored, counts.duplicated) == (n, n, 0)
    assert_nothing_half_written(fleet, job)
    # Workers and the scheduler rode it out: nobody exited.
    assert all(p.poll() is None for p in fleet.procs.items), fleet.logs()

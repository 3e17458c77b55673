"""Soak, CI-sized: thousands of rows through Redis + Postgres while workers are killed and restarted;
and the real model with a worker killed mid-run. Zero lost, zero duplicated."""

from __future__ import annotations

import itertools
import subprocess
import time
from pathlib import Path

import pytest

from tests.reliability.conftest import Stack, kill9, wait_for, write_dataset

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]


@pytest.mark.timeout(300)
def test_soak_2000_rows_with_workers_killed_and_restarted(fleet: Stack) -> None:
    # A worker killed between receiving a message and claiming its chunk loses that message (Redis keeps it
    # unacked for the visibility timeout): requeue_seconds bounds that rare stall for the test's sake.
    fleet.settings = fleet.settings.with_(requeue_seconds=20.0)
    n, delay, chunk = 2000, "0.03", 20
    job = fleet.submit(write_dataset(fleet.tmp / "soak.jsonl", n), "--chunk-size", str(chunk))
    started = time.monotonic()
    fleet.scheduler()
    names = ["s0", "s1", "s2"]
    workers: dict[str, subprocess.Popen[bytes]] = {
        name: fleet.worker(name=name, env={"TOKENMILL_STUB_DELAY": delay}) for name in names
    }
    kills: list[tuple[float, int]] = []
    for name in itertools.cycle(names):
        if len(kills) >= 5 or fleet.state(job) == "completed" or fleet.results(job) > n * 0.85:
            break
        try:
            wait_for(lambda name=name: fleet.running_chunk_of(name, 1), 30, f"{name} inside a chunk")  # type: ignore[misc]
        except AssertionError:
            continue
        kill9(workers[name])
        kills.append((time.monotonic() - started, fleet.results(job)))
        workers[name] = fleet.worker(name=name, env={"TOKENMILL_STUB_DELAY": delay})
        time.sleep(2.5)
    fleet.wait_state(job, timeout=180)
    wall = time.monotonic() - started
    counts = fleet.counts(job)
    gens = fleet.generations()
    print(
        f"\nsoak: {counts}; {len(kills)} kill -9 at (s, rows done) {[(round(t, 1), r) for t, r in kills]}; "
        f"{wall:.1f}s wall; {sum(gens.values()) - n} rows generated twice"
    )
    assert len(kills) >= 3, "the job finished before three workers could be killed; raise the stub delay"
    assert (counts.expected, counts.stored, counts.duplicated) == (n, n, 0)
    assert set(gens) == {f"r{i}" for i in range(n)}
    # A kill loses only the victim's rows not yet group-committed, all inside the one chunk it held: the
    # claimant after it generates those again, nothing else (test_crashes counts them exactly).
    assert sum(gens.values()) - n <= len(kills) * chunk


@pytest.mark.model
@pytest.mark.timeout(300)
def test_real_model_with_a_worker_killed_and_restarted(fleet: Stack, smollm2_path: Path) -> None:
    n = 36  # 6 chunks of 6; one row at a time, so a chunk is "part done" for most of its run
    job = fleet.submit(write_dataset(fleet.tmp / "real.jsonl", n, max_tokens=8), "--chunk-size", "6", stub=False)
    fleet.scheduler()
    real = ("--n-seq", "1")
    victim = fleet.worker(*real, name="victim", stub=False)
    fleet.worker(*real, name="steady", stub=False)
    chunk_id, done = wait_for(lambda: fleet.running_chunk_of("victim", 1), 120, "the victim inside a chunk", fleet.logs)
    kill9(victim)
    at_kill = fleet.results(job)
    fleet.worker(*real, name="victim2", stub=False)
    fleet.wait_state(job, timeout=240)
    counts = fleet.counts(job)
    variants = fleet.query("SELECT DISTINCT variant FROM results WHERE job_id = :j", j=job)
    statuses = fleet.query("SELECT DISTINCT status FROM results WHERE job_id = :j", j=job)
    attempts = fleet.query("SELECT attempts FROM chunks WHERE id = :c", c=chunk_id)[0][0]
    print(f"\nreal model, worker killed at {at_kill}/{n} rows ({done} of its chunk done): {counts}")
    assert (counts.expected, counts.stored, counts.duplicated) == (n, n, 0)
    assert attempts >= 2  # the killed chunk was finished by another worker
    assert [v for (v,) in variants] == ["smollm2-135m-instruct:q4_1"] and [s for (s,) in statuses] == ["succeeded"]

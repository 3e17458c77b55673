"""kill -9 of workers, worker process groups, the scheduler and `tokenmill run`: every row exactly once.

Each test counts rows in the store (expected, stored, duplicated) and, through the stub engine's
generation log, how many times each row was *generated*: a row may be generated twice only when its
worker died between generating it and storing it.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from tests.reliability.conftest import Stack, kill9, wait_for, write_dataset


@pytest.mark.parametrize("stack_name", ["fleet", "embedded"])
@pytest.mark.parametrize("group", [False, True], ids=["pid", "pgroup"])
def test_kill9_worker_mid_chunk(stack_name: str, group: bool, request: pytest.FixtureRequest) -> None:
    """A worker (or, with `--concurrency 2`, its supervisor and both children) dies inside a chunk."""
    stack: Stack = request.getfixturevalue(stack_name)
    n = 120
    job = stack.submit(write_dataset(stack.tmp / "d.jsonl", n), "--chunk-size", "20")
    stack.scheduler()
    victim = stack.worker("--concurrency", "2", name="victim") if group else stack.worker(name="victim")
    chunk_id, _ = wait_for(lambda: stack.running_chunk_of("victim", 2), 60, "the victim inside a chunk", stack.logs)
    kill9(victim, group=group)
    killed_at = time.monotonic()
    generated_before_kill = set(stack.generations())
    assert stack.results(job) < n
    stack.worker(name="survivor")
    stack.wait_state(job, timeout=90)
    recovered_in = time.monotonic() - killed_at
    counts = stack.counts(job)
    attempts, owner = stack.query("SELECT attempts, state FROM chunks WHERE id = :c", c=chunk_id)[0]
    gens = stack.generations()
    print(
        f"\nkill -9 {'process group' if group else 'worker'} on {stack_name}: {counts}; "
        f"job done {recovered_in:.1f}s after the kill; generations {sum(gens.values())} for {n} rows"
    )
    assert (counts.expected, counts.stored, counts.duplicated) == (n, n, 0)
    assert attempts >= 2 and owner == "done"  # the killed chunk was reopened and finished by someone else
    assert set(gens) == {f"r{i}" for i in range(n)}
    # Only rows the victim generated but had not committed (in flight, or in its writer's buffer) are
    # generated again, each exactly once more; a row the victim stored is never generated twice.
    assert {cid for cid, k in gens.items() if k > 1} == generated_before_kill - stack.stored_by(job, "victim")
    assert max(gens.values()) <= 2, gens.most_common(3)


@pytest.mark.parametrize("stack_name", ["fleet", "embedded"])
def test_kill9_worker_with_a_full_write_buffer(stack_name: str, request: pytest.FixtureRequest) -> None:
    """Group commit's price: a worker killed with a batch of results generated but not yet committed loses
    exactly those rows; the next claimant generates them again and every row is stored exactly once."""
    stack: Stack = request.getfixturevalue(stack_name)
    n, batch = 120, 8
    job = stack.submit(write_dataset(stack.tmp / "d.jsonl", n), "--chunk-size", "60")
    stack.scheduler()
    # Batches are cut by size only (no time limit within the test), so up to 7 rows sit in the buffer.
    slow_commit = {"TOKENMILL_RESULT_BATCH_ROWS": str(batch), "TOKENMILL_RESULT_BATCH_MS": "600000"}
    victim = stack.worker(name="victim", env=slow_commit)

    def buffered() -> int:
        """Rows the victim generated whose results are not in the store yet, once a batch has been stored."""
        stored = stack.results(job)
        return len(stack.generations()) - stored if stored >= batch else 0

    wait_for(lambda: buffered() >= batch // 2, 60, "the victim's write buffer to fill", stack.logs)
    kill9(victim)
    lost = set(stack.generations()) - stack.stored_by(job, "victim")
    assert batch // 2 <= len(lost) <= 3 * batch + 1  # the buffer (two batches queued, one committing) + 1
    stack.worker(name="survivor")
    stack.wait_state(job, timeout=90)
    counts = stack.counts(job)
    gens = stack.generations()
    print(f"\nkill -9 with a full write buffer on {stack_name}: {counts}; {len(lost)} uncommitted rows lost")
    assert (counts.expected, counts.stored, counts.duplicated) == (n, n, 0)
    assert set(gens) == {f"r{i}" for i in range(n)}
    assert {cid for cid, k in gens.items() if k > 1} == lost  # regenerated: exactly the lost rows, once each
    assert max(gens.values()) == 2


def test_kill9_scheduler_and_start_again(fleet: Stack) -> None:
    n = 200
    job = fleet.submit(write_dataset(fleet.tmp / "d.jsonl", n), "--chunk-size", "10")
    scheduler = fleet.scheduler()
    # One chunk per task: only the dispatcher sends work. (A worker claiming the job's next chunks
    # itself, the default, would go on through the whole job with the scheduler dead.)
    single = {"TOKENMILL_STUB_DELAY": "0.03", "TOKENMILL_CHAIN_CHUNKS": "0"}
    fleet.worker(env=single)
    fleet.worker(env=single)
    fleet.wait_results(job, 20)
    kill9(scheduler)
    time.sleep(3)  # workers drain what was already queued; nothing new is dispatched
    stalled = fleet.results(job)
    time.sleep(2)
    assert fleet.results(job) == stalled < n, "with no scheduler nothing new may be dispatched"
    scheduler = fleet.scheduler()
    fleet.wait_results(job, stalled + 20)
    kill9(scheduler)  # and once more, for good measure
    fleet.scheduler()
    fleet.wait_state(job, timeout=90)
    counts = fleet.counts(job)
    print(f"\nkill -9 scheduler twice: {counts}")
    assert (counts.expected, counts.stored, counts.duplicated) == (n, n, 0)
    assert sum(fleet.generations().values()) == n  # no worker died: nothing generated twice


def _local_worker_pids(stack: Stack) -> list[int]:
    return [int(pid) for (pid,) in stack.query("SELECT pid FROM workers")]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("tree", [False, True], ids=["run-only", "whole-tree"])
def test_kill9_run_then_same_command_resumes(embedded: Stack, tree: bool) -> None:
    """kill -9 of `tokenmill run` (alone: its local workers notice and stop; or with its whole process
    tree, as when the machine loses it), then the same command again resumes the job."""
    n = 150
    data = write_dataset(embedded.tmp / "docs.jsonl", n)
    args = ("run", str(data), "--workers", "2", "--threads", "1", "--chunk-size", "10")
    env = embedded.worker_env(delay=0.05)
    first = embedded.procs.start(embedded.settings, *args, env=env, name="run1")
    job = wait_for(lambda: embedded.query("SELECT id FROM jobs"), 60, "the job", embedded.logs)[0][0]
    embedded.wait_results(job, 30)
    pids = _local_worker_pids(embedded)
    embedded.adopt(pids)
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    kill9(first)
    if tree:
        for pid in pids:  # each local worker leads its own process group
            os.killpg(pid, signal.SIGKILL)
    # Orphaned local workers must not live on (holding a model, taking chunks) once their `run` is gone.
    wait_for(lambda: not any(_alive(p) for p in pids), 30, "the orphaned local workers to exit", embedded.logs)
    before = {
        seq: (rid, created, worker)
        for seq, rid, created, worker in embedded.query(
            "SELECT seq, id, created_at, worker_id FROM results WHERE job_id = :j", j=job
        )
    }
    assert 0 < len(before) < n
    assert embedded.state(job) == "running"
    second = embedded.cli(*args, env=env, timeout=180)
    assert second.returncode == 0, second.stderr
    assert f"resuming job {job}" in second.stderr
    counts = embedded.counts(job)
    after = {
        seq: (rid, created, worker)
        for seq, rid, created, worker in embedded.query(
            "SELECT seq, id, created_at, worker_id FROM results WHERE job_id = :j", j=job
        )
    }
    gens = embedded.generations()
    print(
        f"\nkill -9 run ({'whole tree' if tree else 'run only'}): {counts}; {len(before)} rows done before "
        f"the kill, {sum(gens.values())} generations for {n} rows"
    )
    assert (counts.expected, counts.stored, counts.duplicated) == (n, n, 0)
    assert embedded.state(job) == "completed"
    assert {seq: after[seq] for seq in before} == before  # the first run's results are untouched
    assert all(gens[f"r{seq}"] == 1 for seq in before)  # ... and were not generated again
    assert len((embedded.tmp / "docs.results.jsonl").read_text().splitlines()) == n

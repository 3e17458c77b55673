"""Row failures (retried, then recorded with their reason; `tokenmill retry` re-runs only them) and
`tokenmill cancel` (dispatch stops at once, running chunks at the next row)."""

from __future__ import annotations

import json
import time

from tests.reliability.conftest import Stack, wait_for, write_dataset

FAILING = {5, 17}


def test_failed_rows_are_retried_recorded_and_retried_again_on_request(fleet: Stack) -> None:
    n = 30
    data = write_dataset(fleet.tmp / "d.jsonl", n, prompt=lambda i: f"FAIL row {i}" if i in FAILING else f"row {i}")
    job = fleet.submit(data, "--chunk-size", "10")
    heal = fleet.tmp / "heal"
    env = {"TOKENMILL_STUB_FAIL": "FAIL", "TOKENMILL_STUB_HEAL": str(heal)}
    fleet.scheduler()
    fleet.worker(env=env)
    fleet.wait_state(job, ("completed_with_errors", "completed"), timeout=60)
    assert fleet.state(job) == "completed_with_errors"
    max_attempts = fleet.settings.max_row_attempts
    failed = fleet.query(
        "SELECT seq, attempts, error_code, error FROM results WHERE job_id = :j AND status = 'failed' ORDER BY seq",
        j=job,
    )
    assert [(seq, attempts, code) for seq, attempts, code, _ in failed] == [
        (seq, max_attempts, "generation_failed") for seq in sorted(FAILING)
    ]
    assert all(f"line {seq + 1}:" in err and "stub engine failure" in err for seq, _, _, err in failed), failed
    tries = [line.split()[1] for line in fleet.gen_log.read_text().splitlines() if line.endswith(" failed")]
    assert sorted(tries) == sorted([f"r{seq}" for seq in FAILING] * max_attempts)  # retried up to the limit
    counts = fleet.counts(job)
    print(f"\nrow failures: {counts}, {len(failed)} failed after {max_attempts} attempts each")
    assert (counts.expected, counts.stored, counts.duplicated) == (n, n, 0)

    status = fleet.cli("status", job, "--wait", "--json")
    assert status.returncode == 7 and json.loads(status.stdout)["failed"] == len(FAILING)
    errors = fleet.tmp / "errors.jsonl"
    assert fleet.cli("results", job, "-o", str(fleet.tmp / "out.jsonl"), "--errors", str(errors)).returncode == 0
    lines = [json.loads(line) for line in errors.read_text().splitlines()]
    assert [(e["custom_id"], e["error"]["line"]) for e in lines] == [(f"r{s}", s + 1) for s in sorted(FAILING)]

    kept = {
        seq: (rid, created)
        for seq, rid, created in fleet.query(
            "SELECT seq, id, created_at FROM results WHERE job_id = :j AND status = 'succeeded'", j=job
        )
    }
    heal.touch()
    retry = fleet.cli("retry", job)
    assert retry.returncode == 0 and f"{len(FAILING)} failed rows queued again" in " ".join(retry.stderr.split())
    fleet.wait_state(job, ("completed", "completed_with_errors"), timeout=60)
    assert fleet.state(job) == "completed"
    after = fleet.query("SELECT seq, id, created_at, status, attempts FROM results WHERE job_id = :j", j=job)
    counts = fleet.counts(job)
    print(f"after `tokenmill retry`: {counts}")
    assert (counts.expected, counts.stored, counts.duplicated) == (n, n, 0)
    assert {seq: (rid, created) for seq, rid, created, _, _ in after if seq not in FAILING} == kept  # untouched
    assert {(seq, status, attempts) for seq, _, _, status, attempts in after if seq in FAILING} == {
        (seq, "succeeded", 1) for seq in FAILING
    }
    gens = fleet.generations()
    assert sum(gens.values()) == n and set(gens.values()) == {1}  # only the failed rows ran again
    assert fleet.cli("status", job, "--wait").returncode == 0


def test_cancel_stops_dispatch_and_running_chunks(fleet: Stack) -> None:
    n, size = 600, 60  # 3 s per chunk at 0.05 s per row: a cancel lands inside running chunks
    job = fleet.submit(write_dataset(fleet.tmp / "d.jsonl", n), "--chunk-size", str(size))
    fleet.scheduler()
    fleet.worker(name="c1", env={"TOKENMILL_STUB_DELAY": "0.05"})
    fleet.worker(name="c2", env={"TOKENMILL_STUB_DELAY": "0.05"})
    wait_for(
        lambda: fleet.running_chunk_of("c1", 5) and fleet.running_chunk_of("c2", 5),
        60,
        "both workers in the middle of a chunk",
        fleet.logs,
    )
    cancel = fleet.cli("cancel", job)
    assert cancel.returncode == 0 and "cancelled" in cancel.stderr
    at_cancel = fleet.results(job)
    assert fleet.state(job) == "cancelled"
    assert fleet.chunk_states(job)["queued"] == 0  # dispatch stopped at once: nothing left in the queue

    def settled() -> int | None:
        first = fleet.results(job)
        time.sleep(1.5)
        return first if fleet.results(job) == first else None

    # Running chunks notice at their next heartbeat (1 s here) and stop at the next row boundary.
    stopped_at = wait_for(settled, 5, "results to stop growing after cancel", fleet.logs)
    time.sleep(3)
    final = fleet.results(job)
    chunks = fleet.chunk_states(job)
    counts = fleet.counts(job)
    print(
        f"\ncancel: {at_cancel} results at cancel, {stopped_at} when they stopped, {final} 3 s later; "
        f"{counts}; chunks {dict(chunks)}"
    )
    assert final == stopped_at < n
    assert stopped_at - at_cancel <= 2 * 25  # at most ~1 s of rows per worker
    assert set(chunks) <= {"done", "cancelled", "pending"} and chunks["cancelled"] > 0
    # The two running chunks stopped at a row boundary, part done, and were handed back (not left leased).
    partial = fleet.query(
        "SELECT (SELECT count(*) FROM results r WHERE r.job_id = c.job_id AND r.seq BETWEEN c.first_seq"
        " AND c.last_seq), c.lease_owner FROM chunks c WHERE c.job_id = :j AND c.state = 'pending'",
        j=job,
    )
    # A chunk a worker had claimed ahead (its current one was draining, see workers/feed.py) comes back
    # untouched.
    started = [done for done, _ in partial if done > 0]
    assert all(owner is None for _, owner in partial), partial
    assert len(started) == 2 and all(0 < done < size for done in started), partial
    assert counts.duplicated == 0
    assert fleet.state(job) == "cancelled"
    assert all(p.poll() is None for p in fleet.procs.items)  # workers idle, not dead

    # A cancelled job can be taken up again: the rest runs, nothing done is redone.
    assert fleet.cli("retry", job).returncode == 0
    fleet.wait_state(job, timeout=90)
    counts = fleet.counts(job)
    print(f"after retry of the cancelled job: {counts}")
    assert (counts.expected, counts.stored, counts.duplicated) == (n, n, 0)
    gens = fleet.generations()
    assert sum(gens.values()) == n

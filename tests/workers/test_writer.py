"""Group commit: results stored in batches by the writer thread, counted once per batch, flushed per chunk."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from sqlalchemy import select

from tests.workers.test_runtime_claims import ScriptedEngine, chunk_ids, make_job, results, runtime
from tokenmill.config import Settings
from tokenmill.errors import ConfigError
from tokenmill.store import Store, leases
from tokenmill.store import results as store_results
from tokenmill.store import workers as store_workers
from tokenmill.store.states import ResultStatus
from tokenmill.store.tables import Worker
from tokenmill.workers.writer import ResultWriter


def _row(job_id: str, seq: int, tokens: int = 2) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "seq": seq,
        "custom_id": f"r{seq}",
        "status": ResultStatus.SUCCEEDED,
        "body": {"n": seq},
        "worker_id": "w1",
        "completion_tokens": tokens,
    }


def _claimed(store: Store, job_id: str, worker_id: str = "w1") -> None:
    """Give ``worker_id`` the lease of every chunk of the job: the writer stores rows only under a lease."""
    for chunk_id in chunk_ids(store, job_id):
        with store.session() as s:
            assert leases.claim(s, chunk_id, worker_id, 60.0) is not None


def test_write_results_skips_answered_rows_and_returns_only_its_own(any_store: Store) -> None:
    store = any_store
    job = make_job(store, 6, 6)
    with store.session() as s:
        assert store_results.write_result(s, _row(job, 1))
    failed = {"job_id": job, "seq": 4, "custom_id": "r4", "status": ResultStatus.FAILED, "error": "x", "attempts": 3}
    with store.session() as s:  # two column sets (succeeded and failed rows) in one transaction
        inserted = store_results.write_results(s, [_row(job, 0), _row(job, 1), _row(job, 2), failed])
    assert inserted == {(job, 0), (job, 2), (job, 4)}
    stored = results(store, job)
    assert [r.seq for r in stored] == [0, 1, 2, 4]
    assert stored[3].status == ResultStatus.FAILED and stored[3].attempts == 3


def test_writer_batches_counts_once_per_batch_and_flush_waits(any_store: Store) -> None:
    store = any_store
    job = make_job(store, 10, 10)
    with store.session() as s:
        store_workers.register(s, id="w1", name="w1", host="h", pid=1, state="ready", queues=["q"])
    _claimed(store, job)
    writer = ResultWriter(store, "w1", batch_rows=4, batch_ms=60_000)  # only size or a flush cuts a batch
    try:
        for seq in range(10):
            writer.put(_row(job, seq, tokens=seq), seq)
        writer.flush()
        assert [r.seq for r in results(store, job)] == list(range(10))
        assert writer.batches == 3  # 4 + 4 + the 2 the flush cut short
        writer.put(_row(job, 3), 100)  # already stored: neither inserted nor counted
        writer.flush()
    finally:
        writer.close()
    with store.session() as s:
        w = s.scalars(select(Worker).where(Worker.id == "w1")).one()
        assert (w.rows_done, w.tokens_generated) == (10, sum(range(10)))


def test_writer_cuts_a_batch_after_batch_ms(store: Store) -> None:
    job = make_job(store, 3, 3)
    _claimed(store, job)
    writer = ResultWriter(store, "w1", batch_rows=64, batch_ms=50)
    try:
        writer.put(_row(job, 0), 1)
        for _ in range(200):  # no flush: the time limit alone must commit it
            if results(store, job):
                break
            time.sleep(0.05)
        assert [r.seq for r in results(store, job)] == [0]
    finally:
        writer.close()


def test_a_failed_batch_surfaces_at_flush_and_the_chunk_stays_open(store: Store, settings: Settings) -> None:
    job = make_job(store, 4, 4)
    _claimed(store, job)
    writer = ResultWriter(store, "w1", batch_rows=8, batch_ms=10)
    try:
        writer.put({**_row(job, 0), "status": None}, 1)  # violates NOT NULL: the batch fails
        with pytest.raises(Exception, match=r"(?i)not null"):
            writer.flush()
        writer.put(_row(job, 1), 1)  # the writer outlives the error
        writer.flush()
    finally:
        writer.close()
    assert [r.seq for r in results(store, job)] == [1]


def test_a_failed_batch_is_logged_without_the_values_it_carried(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "an-output-the-tenant-owns"
    job = make_job(store, 2, 2)
    _claimed(store, job)
    writer = ResultWriter(store, "w1", batch_rows=8, batch_ms=10)
    try:
        writer.put({**_row(job, 0), "status": None, "body": {"text": secret}, "custom_id": secret}, 1)
        with caplog.at_level(logging.WARNING), pytest.raises(Exception, match=r"(?i)not null"):
            writer.flush()
    finally:
        writer.close()
    assert "storing 1 results failed: IntegrityError" in caplog.text and secret not in caplog.text


def test_a_worker_that_lost_its_lease_stores_nothing_for_that_chunk(any_store: Store) -> None:
    """Cut off past its lease (tests/reliability/test_partition.py), a worker's late batch is not stored,
    even for rows the chunk's new owner has not answered yet; its other chunk's rows still are."""
    store = any_store
    job = make_job(store, 8, 4)
    first, second = chunk_ids(store, job)
    with store.session() as s:
        assert leases.claim(s, first, "w1", -1.0) is not None  # a lease that has already run out ...
        assert leases.claim(s, first, "w2", 60.0) is not None  # ... so w2 takes the chunk over
        assert leases.claim(s, second, "w1", 60.0) is not None
    writer = ResultWriter(store, "w1", batch_rows=64, batch_ms=60_000)
    try:
        for seq in (0, 1, 4):  # rows 0-3 are the first chunk, now w2's
            writer.put(_row(job, seq), 2)
        writer.flush()
    finally:
        writer.close()
    assert [r.seq for r in results(store, job)] == [4]
    assert writer.dropped == 2


def test_runtime_completes_a_chunk_with_all_rows_stored_in_few_commits(store: Store, settings: Settings) -> None:
    job = make_job(store, 40, 40)
    rt = runtime(store, settings.with_(result_batch_rows=16, result_batch_ms=60_000), ScriptedEngine())
    try:
        outcome = rt.process_chunk(job, chunk_ids(store, job)[0])
    finally:
        rt.close()
    assert outcome.generated == 40
    assert len(results(store, job)) == 40
    assert rt.writer.batches == 3  # 16 + 16 + 8 at the chunk's flush, not 40 commits
    with store.session() as s:
        w = s.get(Worker, "w1")
        assert w is not None and (w.rows_done, w.tokens_generated) == (40, 80)


def test_result_batch_settings_from_env() -> None:
    s = Settings.from_env({"TOKENMILL_RESULT_BATCH_ROWS": "128", "TOKENMILL_RESULT_BATCH_MS": "50"})
    assert (s.result_batch_rows, s.result_batch_ms) == (128, 50.0)
    assert s.as_env()["TOKENMILL_RESULT_BATCH_ROWS"] == "128"
    with pytest.raises(ConfigError, match="RESULT_BATCH_ROWS"):
        Settings.from_env({"TOKENMILL_RESULT_BATCH_ROWS": "5000"})

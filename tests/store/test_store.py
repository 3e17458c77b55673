"""Store round-trips on real SQLite and real Postgres."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from tokenmill.errors import JobNotFound, ServiceUnavailable
from tokenmill.rows import CHAT, DatasetRow, SamplingParams
from tokenmill.store import Store, leases
from tokenmill.store import jobs as store_jobs
from tokenmill.store import results as store_results
from tokenmill.store import workers as store_workers
from tokenmill.store.tables import Chunk, RequestRow, Result


def rows(n: int) -> list[DatasetRow]:
    return [
        DatasetRow(
            line=i + 1,
            custom_id=f"r{i}",
            endpoint=CHAT,
            messages=({"role": "user", "content": f"question {i}"},),
            params=SamplingParams(max_tokens=8, temperature=0.0, stop=("\n",), seed=7),
        )
        for i in range(n)
    ]


def make_job(store: Store, n: int = 10, chunk_size: int = 4) -> str:
    with store.session() as s:
        job = store_jobs.create_job(s, key="k", name="t.jsonl", family="fam", queue="tm.fam", chunk_size=chunk_size)
        store_jobs.ingest_rows(s, job, rows(n))
        return job.id


def answer(s: Session, job_id: str, first: int, last: int, status: str = "succeeded") -> None:
    """Store a result for each row of ``first..last`` (what a worker's writer does before completing)."""
    for seq in range(first, last + 1):
        store_results.write_result(s, {"job_id": job_id, "seq": seq, "custom_id": f"r{seq}", "status": status})


def test_ingest_cuts_chunks_and_round_trips_rows(any_store: Store) -> None:
    job_id = make_job(any_store, n=10, chunk_size=4)
    with any_store.session() as s:
        job = store_jobs.get_job(s, job_id[:6])
        assert (job.total_rows, job.n_chunks, job.state) == (10, 3, "queued")
        chunks = list(s.scalars(select(Chunk).where(Chunk.job_id == job_id).order_by(Chunk.idx)))
        assert [(c.first_seq, c.last_seq) for c in chunks] == [(0, 3), (4, 7), (8, 9)]
        stored = store_jobs.load_rows(s, job_id, 4, 7)
        back = [DatasetRow.from_payload(r.line, r.custom_id, r.payload) for r in stored]
    assert back == rows(10)[4:8]


def test_results_are_unique_per_job_and_row(any_store: Store) -> None:
    job_id = make_job(any_store, n=3)
    values = {"job_id": job_id, "seq": 1, "custom_id": "r1", "status": "succeeded", "body": {"x": 1}}
    with any_store.session() as s:
        assert store_results.write_result(s, values) is True
    with any_store.session() as s:
        assert store_results.write_result(s, {**values, "body": {"x": 2}}) is False
        stored = list(s.scalars(select(Result).where(Result.job_id == job_id)))
    assert len(stored) == 1 and stored[0].body == {"x": 1}


def test_lease_excludes_a_second_worker_until_it_expires(any_store: Store) -> None:
    job_id = make_job(any_store, n=4, chunk_size=4)
    with any_store.session() as s:
        chunk_id = s.scalar(select(Chunk.id).where(Chunk.job_id == job_id))
    assert chunk_id is not None
    with any_store.session() as s:
        assert leases.claim(s, chunk_id, "w1", lease_seconds=0.5) is not None
    with any_store.session() as s:
        assert leases.claim(s, chunk_id, "w2", lease_seconds=30) is None
    time.sleep(0.6)
    with any_store.session() as s:
        assert leases.claim(s, chunk_id, "w2", lease_seconds=30) is not None
    with any_store.session() as s:
        assert leases.renew(s, chunk_id, "w1", 30) is False
        answer(s, job_id, 0, 3)
        assert leases.complete(s, chunk_id, "w1") is False
        assert leases.complete(s, chunk_id, "w2") is True
    with any_store.session() as s:
        assert leases.claim(s, chunk_id, "w3", lease_seconds=30) is None


def test_expire_reopens_chunks_of_silent_workers(any_store: Store) -> None:
    job_id = make_job(any_store, n=4, chunk_size=2)
    with any_store.session() as s:
        store_workers.register(s, id="dead", name="d", host="h", pid=1, state="busy")
        ids = list(s.scalars(select(Chunk.id).where(Chunk.job_id == job_id)))
        leases.claim(s, ids[0], "dead", lease_seconds=300)
    with any_store.session() as s:
        assert leases.expire(s, lost_after=60) == 0
        store_workers.heartbeat(s, "dead")
    with any_store.session() as s:
        s.execute(update(Chunk).values(lease_expires_at=time.time() - 1))
        assert leases.expire(s, lost_after=60) == 1
        assert s.get(Chunk, ids[0]).state == "pending"  # type: ignore[union-attr]


def test_cancel_and_retry_reopen_only_what_they_should(any_store: Store) -> None:
    job_id = make_job(any_store, n=6, chunk_size=2)
    with any_store.session() as s:
        for seq in range(6):
            status = "failed" if seq == 3 else "succeeded"
            store_results.write_result(s, {"job_id": job_id, "seq": seq, "custom_id": f"r{seq}", "status": status})
        s.execute(update(Chunk).values(state="done"))
        job = store_jobs.get_job(s, job_id)
        job.state = "completed_with_errors"
    with any_store.session() as s:
        assert store_jobs.retry_failed(s, store_jobs.get_job(s, job_id)) == 1
    with any_store.session() as s:
        states = dict(s.execute(select(Chunk.idx, Chunk.state).where(Chunk.job_id == job_id)).all())
        assert states == {0: "done", 1: "pending", 2: "done"}
        assert s.scalar(select(func.count()).select_from(Result).where(Result.job_id == job_id)) == 5
        assert store_jobs.get_job(s, job_id).state == "queued"
        assert store_jobs.cancel_job(s, store_jobs.get_job(s, job_id)) is True
    with any_store.session() as s:
        assert store_jobs.get_job(s, job_id).state == "cancelled"
        assert s.scalar(select(func.count()).select_from(Chunk).where(Chunk.state == "cancelled")) == 1
        assert s.scalar(select(func.count()).select_from(RequestRow)) == 6


def test_unknown_job_and_unreachable_database_are_clean_errors(store: Store) -> None:
    with store.session() as s, pytest.raises(JobNotFound, match="no job 'nope'"):
        store_jobs.get_job(s, "nope")
    bad = Store("postgresql://tm:s3cret@127.0.0.1:1/none")
    with pytest.raises(ServiceUnavailable) as err:
        bad.ping()
    assert "s3cret" not in str(err.value) and "tm:***@127.0.0.1:1" in str(err.value)

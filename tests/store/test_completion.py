"""Completion is a fact the store checks, and every job transition is conditional (real SQLite and Postgres).

Each test plays out, statement by statement, a history the old read-then-write code got wrong.
"""

from __future__ import annotations

from sqlalchemy import select, update

from tests.store.test_store import answer, make_job
from tokenmill.store import Store, leases
from tokenmill.store import jobs as store_jobs
from tokenmill.store import results as store_results
from tokenmill.store.tables import Chunk, Job


def chunk_ids(store: Store, job_id: str) -> list[int]:
    with store.session() as s:
        return list(s.scalars(select(Chunk.id).where(Chunk.job_id == job_id).order_by(Chunk.idx)))


def test_a_chunk_with_an_unanswered_row_is_not_completed_but_handed_back(any_store: Store) -> None:
    job_id = make_job(any_store, n=4, chunk_size=4)
    (chunk,) = chunk_ids(any_store, job_id)
    with any_store.session() as s:
        assert leases.claim(s, chunk, "w1", lease_seconds=60) is not None
        answer(s, job_id, 0, 2)  # row 3's batch failed to commit
        assert leases.complete(s, chunk, "w1") is False
    with any_store.session() as s:
        c = s.get(Chunk, chunk)
        assert c is not None and (c.state, c.lease_owner) == ("pending", None)
        assert store_jobs.finish_jobs(s) == []  # the job does not end short
        # the next claim loads exactly the missing row
        assert leases.claim(s, chunk, "w2", lease_seconds=60) is not None
        assert store_results.done_seqs(s, job_id, 0, 3) == {0, 1, 2}
        answer(s, job_id, 3, 3)
        assert leases.complete(s, chunk, "w2") is True
        assert store_jobs.finish_jobs(s) == [job_id]
        assert store_jobs.state_of(s, job_id) == "completed"


def test_a_job_whose_chunks_closed_with_a_row_missing_is_reopened_not_completed(any_store: Store) -> None:
    job_id = make_job(any_store, n=4, chunk_size=2)
    with any_store.session() as s:
        store_jobs.start_job(s, job_id)
        answer(s, job_id, 0, 2)
        s.execute(update(Chunk).where(Chunk.job_id == job_id).values(state="done"))  # a bookkeeping slip
    with any_store.session() as s:
        assert store_jobs.finish_jobs(s) == []
        assert store_jobs.state_of(s, job_id) == "running"
        states = dict(s.execute(select(Chunk.idx, Chunk.state).where(Chunk.job_id == job_id)).all())
        assert states == {0: "done", 1: "pending"}


def test_a_cancel_between_the_dispatchers_read_and_its_write_stands(any_store: Store) -> None:
    job_id = make_job(any_store, n=4, chunk_size=2)
    with any_store.session() as dispatcher:
        seen = [j.id for j in store_jobs.active_jobs(dispatcher)]  # the dispatcher reads the job as queued ...
    assert seen == [job_id]
    with any_store.session() as cli:  # ... a cancel commits meanwhile ...
        assert store_jobs.cancel_job(cli, job_id) is True
    with any_store.session() as dispatcher:
        assert store_jobs.start_job(dispatcher, job_id) is False  # ... and its write changes nothing
    with any_store.session() as s:
        assert store_jobs.state_of(s, job_id) == "cancelled"
        assert store_jobs.cancel_job(s, job_id) is False  # final: a second cancel is a no-op


def test_finish_never_overwrites_a_final_state_or_a_retry(any_store: Store) -> None:
    job_id = make_job(any_store, n=2, chunk_size=2)
    with any_store.session() as s:
        store_jobs.start_job(s, job_id)
        answer(s, job_id, 0, 1, status="failed")
        s.execute(update(Chunk).where(Chunk.job_id == job_id).values(state="done"))
        assert store_jobs.finish_jobs(s) == [job_id]
        assert store_jobs.state_of(s, job_id) == "completed_with_errors"
        assert store_jobs.finish_jobs(s) == []  # a second finisher (two last chunks side by side): no-op
        job = s.get(Job, job_id)
        assert job is not None
        assert store_jobs.retry_failed(s, job) == 2
        assert store_jobs.finish_jobs(s) == []  # the retried job has open chunks again
        assert store_jobs.state_of(s, job_id) == "queued"


def test_a_clean_hand_back_gives_its_attempt_back_and_a_lapse_does_not(any_store: Store) -> None:
    job_id = make_job(any_store, n=2, chunk_size=2)
    (chunk,) = chunk_ids(any_store, job_id)
    with any_store.session() as s:
        for _ in range(6):  # six SIGTERM restarts: each claim handed back cleanly
            assert leases.claim(s, chunk, "w", lease_seconds=60) is not None
            leases.release(s, chunk, "w")
        assert leases.claim(s, chunk, "w", lease_seconds=60) is not None
        assert leases.claim(s, chunk, "w", lease_seconds=60) is not None  # its owner again (first claim, message)
        c = s.get(Chunk, chunk, populate_existing=True)
        assert c is not None and c.attempts == 1
        s.execute(update(Chunk).where(Chunk.id == chunk).values(lease_expires_at=0))  # the process died
        assert leases.claim(s, chunk, "w2", lease_seconds=60) is not None
        c = s.get(Chunk, chunk, populate_existing=True)
        assert c is not None and c.attempts == 2

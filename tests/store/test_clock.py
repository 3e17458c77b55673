"""Lease and heartbeat times come from the database's clock, so hosts whose clocks disagree stay safe.

Each "host" here is this process with ``time.time`` shifted by an injected offset (what a host with a
wrong clock amounts to); the store is real SQLite and real Postgres.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import select, update

from tests.store.test_store import answer, make_job
from tokenmill.config import Settings
from tokenmill.store import Session, Store, leases, views
from tokenmill.store import batches as store_batches
from tokenmill.store import workers as store_workers
from tokenmill.store.clock import db_now
from tokenmill.store.tables import ApiBatch, Chunk, Worker

SKEW = 300.0  # five minutes either way
REAL_TIME: Callable[[], float] = time.time


@contextmanager
def host_clock(monkeypatch: pytest.MonkeyPatch, offset: float) -> Iterator[None]:
    """Run the block as a host whose clock is ``offset`` seconds off."""
    with monkeypatch.context() as m:
        m.setattr(time, "time", lambda: REAL_TIME() + offset)
        yield


def test_a_claimant_ahead_cannot_take_a_live_lease_of_a_worker_behind(
    any_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = make_job(any_store, n=4, chunk_size=4)
    with any_store.session() as s:
        (chunk_id,) = s.scalars(select(Chunk.id).where(Chunk.job_id == job_id))
    with host_clock(monkeypatch, -SKEW), any_store.session() as s:  # the worker's clock is behind
        store_workers.register(s, id="behind", name="b", host="hb", pid=1, state="busy")
        assert leases.claim(s, chunk_id, "behind", lease_seconds=30) is not None
    with host_clock(monkeypatch, +SKEW), any_store.session() as s:  # a second worker, clock ahead
        assert leases.claim(s, chunk_id, "ahead", lease_seconds=30) is None
    with any_store.session() as s:  # the scheduler, right clock: the worker is alive and its lease live
        assert leases.expire(s, lost_after=10) == 0
    with host_clock(monkeypatch, +SKEW), any_store.session() as s:  # a scheduler whose clock is ahead
        assert leases.expire(s, lost_after=10) == 0
        assert store_workers.live_serving(s, "tm.fam", lost_after=10) == 0  # (serves no queue) no error
    with host_clock(monkeypatch, -SKEW), any_store.session() as s:
        store_workers.heartbeat(s, "behind")
        assert leases.renew(s, chunk_id, "behind", 30) is True
        answer(s, job_id, 0, 3)
        assert leases.complete(s, chunk_id, "behind") is True
    with any_store.session() as s:
        chunk = s.get(Chunk, chunk_id)
        worker = s.get(Worker, "behind")
        assert chunk is not None and (chunk.state, chunk.lease_owner) == ("done", "behind")
        assert worker is not None and abs(worker.heartbeat_at - db_now(s)) < 60  # the store's time, not -5 min


def test_the_store_clock_is_the_databases_not_the_callers(any_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    with host_clock(monkeypatch, +SKEW), any_store.session() as s:
        skewed_view = time.time()
        store_now = db_now(s)
    assert abs(store_now - REAL_TIME()) < 60
    assert skewed_view - store_now > SKEW - 60


def _batch(s: Session, window_seconds: float = 3600.0) -> str:
    b = store_batches.create_batch(
        s, owner="t", endpoint="/v1/chat/completions", input_file_id="file-x", completion_window="24h",
        metadata=None, idempotency_key=None, window_seconds=window_seconds,
    )  # fmt: skip
    s.flush()
    return b.id


def test_a_server_ahead_cannot_take_the_batch_lease_of_a_server_behind(
    any_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `tokenmill serve` on one store drive batches under a lease: one per batch, whatever their clocks."""
    with any_store.session() as s:
        batch_id = _batch(s)
    with host_clock(monkeypatch, -SKEW), any_store.session() as s:
        assert store_batches.claim(s, batch_id, "server-behind", 120.0) is not None
    with host_clock(monkeypatch, +SKEW), any_store.session() as s:
        assert store_batches.claim(s, batch_id, "server-ahead", 120.0) is None
    with any_store.session() as s:
        b = s.get(ApiBatch, batch_id)
        assert b is not None and b.lease_owner == "server-behind" and b.lease_until is not None
        assert abs(b.lease_until - (db_now(s) + 120.0)) < 60  # the store's time, not five minutes off


def test_a_batch_window_is_the_stores_clock(any_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch created on a server whose clock is behind does not expire early on one whose clock is right."""
    with host_clock(monkeypatch, -SKEW), any_store.session() as s:
        batch_id = _batch(s, window_seconds=120.0)
    with any_store.session() as s:
        b = s.get(ApiBatch, batch_id)
        assert b is not None and 60 < b.expires_at - db_now(s) <= 120.0
        assert abs(b.created_at - db_now(s)) < 60


def test_a_server_ahead_still_sees_a_live_chunk_lease(any_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancelled batch waits for the rows a worker may still write: its live lease must not look expired."""
    job_id = make_job(any_store, n=4, chunk_size=4)
    with any_store.session() as s:
        (chunk_id,) = s.scalars(select(Chunk.id).where(Chunk.job_id == job_id))
        store_workers.register(s, id="w", name="w", host="h", pid=1, state="busy")
        assert leases.claim(s, chunk_id, "w", lease_seconds=30) is not None
    with host_clock(monkeypatch, +SKEW), any_store.session() as s:
        assert store_batches.live_chunks(s, job_id) == 1
    with host_clock(monkeypatch, -SKEW), any_store.session() as s:
        answer(s, job_id, 0, 3)  # a chunk completes only with every row answered
        assert leases.complete(s, chunk_id, "w") is True
        assert store_batches.live_chunks(s, job_id) == 0


@pytest.mark.parametrize("offset", [+SKEW, -SKEW], ids=["ahead", "behind"])
def test_worker_liveness_shown_on_a_skewed_host_is_the_stores(
    any_store: Store, monkeypatch: pytest.MonkeyPatch, offset: float
) -> None:
    """The dashboard shows a live worker live and a silent one lost, on a server whose clock is off."""
    lost_after = Settings().lost_after  # 15 s
    with any_store.session() as s:
        store_workers.register(s, id="live", name="live", host="h", pid=1, state="busy")
        store_workers.register(s, id="silent", name="silent", host="h", pid=2, state="busy")
        s.execute(update(Worker).where(Worker.id == "silent").values(heartbeat_at=Worker.heartbeat_at - 60))
    with host_clock(monkeypatch, offset), any_store.session() as s:
        shown = {w.id: w.state for w in views.workers(s, lost_after)}
    assert shown == {"live": "busy", "silent": "lost"}

"""Lease and heartbeat times come from the database's clock, so hosts whose clocks disagree stay safe.

Each "host" here is this process with ``time.time`` shifted by an injected offset (what a host with a
wrong clock amounts to); the store is real SQLite and real Postgres.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import select

from tests.store.test_store import answer, make_job
from tokenmill.store import Store, leases
from tokenmill.store import workers as store_workers
from tokenmill.store.clock import db_now
from tokenmill.store.tables import Chunk, Worker

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

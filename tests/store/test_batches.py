"""Batch transitions are conditional UPDATEs: in either order of a race, exactly one side moves the batch."""

from __future__ import annotations

from typing import Any

import pytest

from tests.server.driving import batch, new_batch
from tokenmill.store import Store
from tokenmill.store import batches as store_batches
from tokenmill.store.states import BATCH_FINAL, BatchStatus

A, B = "driver-a", "driver-b"
USAGE: dict[str, Any] = {"completed": 0, "failed": 0, "usage": None, "output_file_id": None, "error_file_id": None}


def _claimed(store: Store, holder: str = A) -> str:
    batch_id = new_batch(store, 1)
    with store.session() as s:
        assert store_batches.claim(s, batch_id, holder, 60.0) is not None
    return batch_id


def test_cancel_first_then_the_drivers_start_changes_nothing(any_store: Store) -> None:
    batch_id = _claimed(any_store)
    with any_store.session() as s:
        assert store_batches.request_cancel(s, batch_id) == store_batches.Cancelled(BatchStatus.CANCELLED, None)
    with any_store.session() as s:
        assert not store_batches.attach_job(s, batch_id, A, "job1", "m")
        assert not store_batches.start(s, batch_id, A, 1)
        assert not store_batches.fail(s, batch_id, A, [], 1)
    assert batch(any_store, batch_id).status == "cancelled"


def test_start_first_then_cancel_moves_to_cancelling_and_names_the_job(any_store: Store) -> None:
    batch_id = _claimed(any_store)
    with any_store.session() as s:
        assert store_batches.attach_job(s, batch_id, A, "job1", "m")
        assert not store_batches.attach_job(s, batch_id, A, "job2", "m")  # one job per batch
        assert store_batches.start(s, batch_id, A, 1)
    with any_store.session() as s:
        assert store_batches.request_cancel(s, batch_id) == store_batches.Cancelled(BatchStatus.CANCELLING, "job1")
        assert store_batches.request_cancel(s, batch_id).status is None  # twice: nothing more
    assert batch(any_store, batch_id).status == "cancelling"


def test_only_the_lease_holder_moves_a_batch_and_it_finishes_once(any_store: Store) -> None:
    batch_id = _claimed(any_store)
    with any_store.session() as s:
        assert store_batches.claim(s, batch_id, B, 60.0) is None  # A's lease is live
        assert store_batches.attach_job(s, batch_id, A, "job1", "m") and store_batches.start(s, batch_id, A, 1)
        assert store_batches.claim(s, batch_id, A, 60.0) is not None
        assert not store_batches.begin_finalizing(s, batch_id, B, BatchStatus.COMPLETED)
        assert store_batches.begin_finalizing(s, batch_id, A, BatchStatus.COMPLETED)
    with any_store.session() as s:  # a cancel while finalizing is too late
        assert store_batches.request_cancel(s, batch_id).status is None
        assert not store_batches.finish(s, batch_id, B, BatchStatus.COMPLETED, **USAGE)
        assert store_batches.finish(s, batch_id, A, BatchStatus.COMPLETED, **USAGE)
        assert not store_batches.finish(s, batch_id, A, BatchStatus.CANCELLED, **USAGE)
    b = batch(any_store, batch_id)
    assert b.status == "completed" and b.lease_owner is None and b.cancelling_at is None


@pytest.mark.parametrize("final", BATCH_FINAL)
def test_no_transition_leaves_a_final_status(store: Store, final: BatchStatus) -> None:
    from sqlalchemy import update

    from tokenmill.store.tables import ApiBatch

    batch_id = _claimed(store)
    with store.session() as s:
        s.execute(update(ApiBatch).where(ApiBatch.id == batch_id).values(status=final, expires_at=0.0))
    with store.session() as s:
        assert store_batches.request_cancel(s, batch_id).status is None
        assert store_batches.expire_validating(s, batch_id) == (False, None)
        assert not store_batches.attach_job(s, batch_id, A, "j", "m")
        assert not store_batches.start(s, batch_id, A, 1)
        assert not store_batches.fail(s, batch_id, A, [], 1)
        assert not store_batches.begin_finalizing(s, batch_id, A, BatchStatus.CANCELLED)
        for target in (BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED):
            assert not store_batches.finish(s, batch_id, A, target, **USAGE)
    assert batch(store, batch_id).status == final

"""The webhook outbox on SQLite and Postgres: queued with the final transition or not at all, one lease
holder at a time, and every event delivered under seeded schedules of failing and dying senders."""

from __future__ import annotations

import json
import random
import time

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from tokenmill.store import Store
from tokenmill.store import batches as store_batches
from tokenmill.store import webhooks as hooks
from tokenmill.store.states import BatchStatus, DeliveryState
from tokenmill.store.tables import ApiBatch, WebhookDelivery

DRIVER = "driver-1"


def _batch(store: Store, owner: str = "key_" + "a" * 24) -> str:
    with store.session() as s:
        b = store_batches.create_batch(
            s, owner=owner, endpoint="/v1/chat/completions", input_file_id="file-x", completion_window="24h",
            metadata=None, idempotency_key=None,
        )  # fmt: skip
        return b.id


def _claimed(store: Store, batch_id: str) -> None:
    with store.session() as s:
        assert store_batches.claim(s, batch_id, DRIVER, 60.0, (BatchStatus.VALIDATING,)) is not None


def _deliveries(store: Store) -> list[WebhookDelivery]:
    with store.session() as s:
        rows = list(s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.created_at)))
        s.expunge_all()
        return rows


def test_the_event_commits_with_the_final_state_or_not_at_all(any_store: Store) -> None:
    batch_id = _batch(any_store)
    _claimed(any_store, batch_id)
    with pytest.raises(RuntimeError), any_store.session() as s:
        assert store_batches.fail(s, batch_id, DRIVER, [{"line": 1, "message": "bad"}], 1)
        raise RuntimeError("the transition's transaction dies before commit")
    assert _deliveries(any_store) == []
    with any_store.session() as s:
        b = s.get(ApiBatch, batch_id)
        assert b is not None and b.status == "validating"
        assert store_batches.fail(s, batch_id, DRIVER, [{"line": 1, "message": "bad"}], 1)
    (d,) = _deliveries(any_store)
    payload = json.loads(d.payload)
    with any_store.session() as s:
        failed_at = s.get(ApiBatch, batch_id).failed_at  # type: ignore[union-attr]
    assert payload == {"id": d.id, "object": "event", "type": "batch.failed", "created_at": int(failed_at or 0),
                       "data": {"id": batch_id}}  # fmt: skip
    assert (d.owner, d.type, d.batch_id, d.state, d.attempts) == (
        "key_" + "a" * 24, "batch.failed", batch_id, DeliveryState.PENDING, 0
    )  # fmt: skip


def test_a_batch_whose_window_ran_out_while_validating_sends_batch_expired(any_store: Store) -> None:
    """expire_validating takes the batch from any lease holder: its event commits with it, or not at all."""
    batch_id = _batch(any_store)
    _claimed(any_store, batch_id)
    with any_store.session() as s:
        s.execute(update(ApiBatch).where(ApiBatch.id == batch_id).values(expires_at=time.time() - 1))
    with pytest.raises(RuntimeError), any_store.session() as s:
        assert store_batches.expire_validating(s, batch_id) == (True, None)
        raise RuntimeError("the transition's transaction dies before commit")
    assert _deliveries(any_store) == []
    with any_store.session() as s:
        assert store_batches.expire_validating(s, batch_id) == (True, None)
        assert store_batches.expire_validating(s, batch_id) == (False, None)  # once
    (d,) = _deliveries(any_store)
    assert (d.type, d.batch_id, d.state) == ("batch.expired", batch_id, DeliveryState.PENDING)


def test_a_second_final_event_for_the_same_batch_rolls_its_transaction_back(any_store: Store) -> None:
    batch_id = _batch(any_store)
    with any_store.session() as s:  # validating: cancelled at once, no job to stop
        assert store_batches.request_cancel(s, batch_id) == store_batches.Cancelled(BatchStatus.CANCELLED, None)
    with pytest.raises(IntegrityError), any_store.session() as s:
        b = s.get(ApiBatch, batch_id)
        assert b is not None
        hooks.enqueue_batch_event(s, b)
    assert [d.type for d in _deliveries(any_store)] == ["batch.cancelled"]


def test_one_holder_at_a_time_and_a_lost_lease_cannot_settle(any_store: Store) -> None:
    batch_id = _batch(any_store)
    with any_store.session() as s:
        assert store_batches.request_cancel(s, batch_id).status == BatchStatus.CANCELLED
    (d,) = _deliveries(any_store)
    with any_store.session() as s:
        first = hooks.claim(s, d.id, "sender-1", 0.5)
    with any_store.session() as s:
        assert first is not None and first.attempts == 1
        assert hooks.claim(s, d.id, "sender-2", 30) is None  # sender-1's lease is live
    time.sleep(0.6)
    with any_store.session() as s:
        second = hooks.claim(s, d.id, "sender-2", 30)
        assert second is not None and second.attempts == 2
    with any_store.session() as s:
        assert not hooks.delivered(s, d.id, "sender-1")  # it came back too late: not its delivery any more
        assert hooks.retry_later(s, d.id, "sender-2", 0.0, "HTTP 503")
    with any_store.session() as s:
        assert hooks.due_ids(s, 10) == [d.id]
        again = hooks.claim(s, d.id, "sender-1", 30)
        assert again is not None and again.attempts == 3
        assert hooks.delivered(s, d.id, "sender-1")
    with any_store.session() as s:
        assert hooks.due_ids(s, 10) == [] and hooks.claim(s, d.id, "sender-3", 30) is None
    (done,) = _deliveries(any_store)
    assert done.state == DeliveryState.DELIVERED and done.delivered_at is not None and done.lease_owner is None
    assert done.last_error == "HTTP 503"  # the last failure stays on record


@pytest.mark.parametrize("seed", range(4))
def test_seeded_schedules_of_failing_and_dying_senders_deliver_every_event(any_store: Store, seed: int) -> None:
    """Senders claim in random order; an attempt succeeds, fails (retry soon) or dies holding the lease
    (nothing settled). Invariants: a settle succeeds only for the current holder, no event is claimed while
    another holder's lease is live, and in the end every event is delivered exactly once as far as the
    store is concerned, with at least one successful send each."""
    rng = random.Random(seed)
    batch_ids = [_batch(any_store, owner=f"key_{i:024x}") for i in range(6)]
    for batch_id in batch_ids:
        _claimed(any_store, batch_id)
        with any_store.session() as s:
            assert store_batches.fail(s, batch_id, DRIVER, [], 0)
    sent: dict[str, int] = {}
    holders: dict[str, tuple[str, float]] = {}  # event -> (holder, lease end) as the test believes it
    lease = 0.2
    deadline = time.monotonic() + 60
    while any(d.state == DeliveryState.PENDING for d in _deliveries(any_store)):
        assert time.monotonic() < deadline, "events still pending after 60 s"
        sender = f"sender-{rng.randrange(3)}"
        with any_store.session() as s:
            due = hooks.due_ids(s, 10)
        if not due:
            time.sleep(0.05)
            continue
        event_id = rng.choice(due)
        before = time.monotonic()  # the lease the store grants ends no earlier than before + lease
        with any_store.session() as s:
            got = hooks.claim(s, event_id, sender, lease)
        if got is None:
            continue
        held = holders.get(event_id)
        assert held is None or held[0] == sender or held[1] <= time.monotonic(), "claimed under a live lease"
        holders[event_id] = (sender, before + lease)
        outcome = rng.choice(("ok", "fail", "die"))
        if outcome == "die":
            continue  # the lease runs out; another sender (or this one) tries again
        if outcome == "ok":
            sent[event_id] = sent.get(event_id, 0) + 1
        with any_store.session() as s:
            settled = (
                hooks.delivered(s, event_id, sender)
                if outcome == "ok"
                else hooks.retry_later(s, event_id, sender, rng.choice((0.0, 0.05)), "HTTP 500")
            )
        assert settled  # settled right after claiming, well inside the lease
        holders.pop(event_id, None)
    rows = _deliveries(any_store)
    assert {d.state for d in rows} == {DeliveryState.DELIVERED}
    assert sorted(sent) == sorted(d.id for d in rows) and all(n == 1 for n in sent.values())
    assert all(d.lease_owner is None and d.attempts >= 1 for d in rows)


def test_give_up_and_skip_end_the_delivery(any_store: Store) -> None:
    for _ in range(2):
        batch_id = _batch(any_store)
        with any_store.session() as s:
            assert store_batches.request_cancel(s, batch_id).status == BatchStatus.CANCELLED
    first, second = (d.id for d in _deliveries(any_store))
    with any_store.session() as s:
        assert hooks.claim(s, first, "me", 30) and hooks.give_up(s, first, "me", "HTTP 410")
        assert hooks.claim(s, second, "me", 30) and hooks.skip(s, second, "me")
    with any_store.session() as s:
        assert hooks.due_ids(s, 10) == []
        assert hooks.count_by_state(s) == {"failed": 1, "skipped": 1}

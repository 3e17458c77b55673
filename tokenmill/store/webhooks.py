"""The webhook outbox: one delivery row per batch event, written in the transaction that made the batch final.

Because the row commits with the batch's final state, an event can be neither lost (a crash after the
commit leaves the row for the next sender) nor sent for a transition that rolled back. Senders take a
row with a lease (a conditional UPDATE, rowcount checked, times from the database's clock as for chunk
leases), so replicas do not send the same event at the same time; a sender that dies mid-send leaves a
lease that runs out and the event is sent again. Delivery is at least once: receivers dedupe on the
event id (``webhook-id``).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from tokenmill.store.clock import db_now, now_sql
from tokenmill.store.states import DeliveryState
from tokenmill.store.tables import ApiBatch, WebhookDelivery

# The event each final batch status sends (OpenAI's names).
EVENT_OF_STATUS = {
    "completed": "batch.completed",
    "failed": "batch.failed",
    "expired": "batch.expired",
    "cancelled": "batch.cancelled",
}


def new_event_id() -> str:
    return "evt_" + uuid.uuid4().hex


def enqueue_batch_event(s: Session, batch: ApiBatch, event_type: str | None = None) -> WebhookDelivery:
    """Queue ``batch``'s final event (by default the one its status names) in the caller's transaction.

    Called once per batch, beside the status write that makes it final; a second call for the same batch
    and event breaks ``uq_webhook_deliveries_batch_type`` and rolls that transaction back, so a final
    transition that runs twice (two replicas racing) commits once and sends once.
    """
    event_type = event_type or EVENT_OF_STATUS[batch.status]
    at = {
        "batch.completed": batch.completed_at,
        "batch.failed": batch.failed_at,
        "batch.expired": batch.expired_at,
        "batch.cancelled": batch.cancelled_at,
    }[event_type]
    now = db_now(s)
    event_id = new_event_id()
    payload = {
        "id": event_id,
        "object": "event",
        "type": event_type,
        "created_at": int(at if at is not None else time.time()),
        "data": {"id": batch.id},
    }
    row = WebhookDelivery(
        id=event_id,
        owner=batch.owner,
        type=event_type,
        batch_id=batch.id,
        payload=json.dumps(payload, separators=(",", ":")),
        state=DeliveryState.PENDING.value,
        attempts=0,
        next_attempt_at=now,
        created_at=now,
    )
    s.add(row)
    s.flush()
    return row


@dataclass(frozen=True)
class Claimed:
    """A delivery a sender holds the lease on: what to send, and how old the event is (database clock)."""

    id: str
    owner: str
    type: str
    payload: str
    attempts: int
    age: float


def due_ids(s: Session, limit: int) -> list[str]:
    now = now_sql(s)
    return list(
        s.scalars(
            select(WebhookDelivery.id)
            .where(
                WebhookDelivery.state == DeliveryState.PENDING.value,
                WebhookDelivery.next_attempt_at <= now,
                or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until < now),
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
        )
    )


def claim(s: Session, delivery_id: str, holder: str, lease_seconds: float) -> Claimed | None:
    """Take the delivery for one attempt unless it is not due, finished, or leased by a live sender."""
    now = now_sql(s)
    res = s.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.state == DeliveryState.PENDING.value,
            WebhookDelivery.next_attempt_at <= now,
            or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until < now),
        )
        .values(lease_owner=holder, lease_until=now + lease_seconds, attempts=WebhookDelivery.attempts + 1)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        return None
    row = s.execute(
        select(
            WebhookDelivery.id,
            WebhookDelivery.owner,
            WebhookDelivery.type,
            WebhookDelivery.payload,
            WebhookDelivery.attempts,
            now - WebhookDelivery.created_at,
        ).where(WebhookDelivery.id == delivery_id)
    ).one()
    return Claimed(row[0], row[1], row[2], row[3], int(row[4]), float(row[5]))


def _settle(s: Session, delivery_id: str, holder: str, **values: object) -> bool:
    """End this sender's attempt (only while it still holds the lease); False when the lease was lost."""
    res = s.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.state == DeliveryState.PENDING.value,
            WebhookDelivery.lease_owner == holder,
        )
        .values(lease_owner=None, lease_until=None, **values)
        .execution_options(synchronize_session=False)
    )
    return bool(res.rowcount == 1)  # type: ignore[attr-defined]


def delivered(s: Session, delivery_id: str, holder: str) -> bool:
    return _settle(s, delivery_id, holder, state=DeliveryState.DELIVERED.value, delivered_at=now_sql(s))


def retry_later(s: Session, delivery_id: str, holder: str, delay: float, error: str) -> bool:
    return _settle(s, delivery_id, holder, next_attempt_at=now_sql(s) + delay, last_error=error[:300])


def give_up(s: Session, delivery_id: str, holder: str, error: str) -> bool:
    return _settle(s, delivery_id, holder, state=DeliveryState.FAILED.value, last_error=error[:300])


def skip(s: Session, delivery_id: str, holder: str) -> bool:
    """The owner has no endpoint for this event: nothing to send, ever (endpoints are read when sending)."""
    return _settle(s, delivery_id, holder, state=DeliveryState.SKIPPED.value, last_error="no endpoint configured")


def count_by_state(s: Session) -> dict[str, int]:
    rows = s.execute(select(WebhookDelivery.state, func.count()).group_by(WebhookDelivery.state))
    return {str(state): int(n) for state, n in rows}

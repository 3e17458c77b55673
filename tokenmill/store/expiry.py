"""File expiry: the bounds OpenAI accepts for ``expires_after``, and the sweep that deletes expired files.

An expired file is already absent to every reader (``files.live``); the sweep only reclaims its space, a
bounded number of files per pass, each in its own short transaction, so a pass never holds the database
for long however much has expired. Two replicas sweeping at once delete the same rows twice: harmless.
"""

from __future__ import annotations

import time

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from tokenmill.store.db import Store
from tokenmill.store.states import DeliveryState
from tokenmill.store.tables import ApiFile, ApiFileChunk, WebhookDelivery

MIN_SECONDS = 3600  # OpenAI's bounds on expires_after.seconds and output_expires_after.seconds
MAX_SECONDS = 30 * 86400
BATCH_INPUT_SECONDS = 30 * 86400  # the default for purpose=batch uploads, as OpenAI
SWEEP_FILES = 50  # files deleted per pass at most
DELIVERY_RETENTION = 30 * 86400  # finished webhook deliveries are kept this long (what was sent, and when)


def expired_file_ids(s: Session, now: float, limit: int) -> list[str]:
    query = select(ApiFile.id).where(ApiFile.expires_at.is_not(None), ApiFile.expires_at <= now)
    return list(s.scalars(query.order_by(ApiFile.expires_at).limit(limit)))


def _delete_if_expired(s: Session, file_id: str, now: float) -> bool:
    """Chunks, then the row, only while the row is still expired (a conditional DELETE; rowcount checked)."""
    gone = s.execute(
        delete(ApiFile)
        .where(ApiFile.id == file_id, ApiFile.expires_at.is_not(None), ApiFile.expires_at <= now)
        .execution_options(synchronize_session=False)
    )
    if gone.rowcount != 1:  # type: ignore[attr-defined]
        return False
    s.execute(delete(ApiFileChunk).where(ApiFileChunk.file_id == file_id).execution_options(synchronize_session=False))
    return True


def sweep_files(store: Store, now: float | None = None, limit: int = SWEEP_FILES) -> int:
    """Delete up to ``limit`` expired files and their chunks; returns how many this pass deleted."""
    now = time.time() if now is None else now
    with store.session() as s:
        ids = expired_file_ids(s, now, limit)
    deleted = 0
    for file_id in ids:
        with store.session() as s:
            deleted += _delete_if_expired(s, file_id, now)
    return deleted


def prune_deliveries(store: Store, now: float | None = None, limit: int = 500) -> int:
    """Forget webhook deliveries finished longer ago than ``DELIVERY_RETENTION`` (up to ``limit`` a pass)."""
    cutoff = (time.time() if now is None else now) - DELIVERY_RETENTION
    with store.session() as s:
        ids = list(
            s.scalars(
                select(WebhookDelivery.id)
                .where(WebhookDelivery.state != DeliveryState.PENDING.value, WebhookDelivery.created_at < cutoff)
                .limit(limit)
            )
        )
        if not ids:
            return 0
        res = s.execute(
            delete(WebhookDelivery)
            .where(WebhookDelivery.id.in_(ids), WebhookDelivery.state != DeliveryState.PENDING.value)
            .execution_options(synchronize_session=False)
        )
        return int(res.rowcount)  # type: ignore[attr-defined]

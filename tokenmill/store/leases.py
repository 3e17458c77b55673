"""Chunk leases: the mechanism that makes redelivery, crashes and scale-out safe.

A worker may only generate for a chunk while it holds an unexpired lease on it; the broker's view of
the world (acked, redelivered, lost) never decides who works on what.
"""

from __future__ import annotations

import time

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import Session

from tokenmill.store.tables import Chunk, Job, Worker


def claim(s: Session, chunk_id: int, worker_id: str, lease_seconds: float) -> Chunk | None:
    """Take the lease if nobody holds a live one and the chunk is not finished; None otherwise."""
    now = time.time()
    res = s.execute(
        update(Chunk)
        .where(
            Chunk.id == chunk_id,
            Chunk.state.in_(("pending", "queued", "running")),
            or_(Chunk.lease_owner.is_(None), Chunk.lease_expires_at < now, Chunk.lease_owner == worker_id),
            Chunk.job_id.in_(select(Job.id).where(Job.state.in_(("queued", "running")))),
        )
        .values(
            state="running",
            lease_owner=worker_id,
            lease_expires_at=now + lease_seconds,
            attempts=Chunk.attempts + 1,
            started_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        return None
    return s.get(Chunk, chunk_id)


def renew(s: Session, chunk_id: int, worker_id: str, lease_seconds: float) -> bool:
    """Extend our lease; False means it was lost (expired and taken, or the job was cancelled)."""
    res = s.execute(
        update(Chunk)
        .where(Chunk.id == chunk_id, Chunk.lease_owner == worker_id, Chunk.state == "running")
        .values(lease_expires_at=time.time() + lease_seconds)
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1  # type: ignore[attr-defined]


def complete(s: Session, chunk_id: int, worker_id: str) -> bool:
    res = s.execute(
        update(Chunk)
        .where(Chunk.id == chunk_id, Chunk.lease_owner == worker_id, Chunk.state == "running")
        .values(state="done", finished_at=time.time(), lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1  # type: ignore[attr-defined]


def release(s: Session, chunk_id: int, worker_id: str) -> None:
    """Hand a chunk back at once (clean shutdown, cancel) instead of letting its lease run out."""
    s.execute(
        update(Chunk)
        .where(Chunk.id == chunk_id, Chunk.lease_owner == worker_id, Chunk.state == "running")
        .values(state="pending", lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )


def expire(s: Session, lost_after: float) -> int:
    """Reopen chunks whose lease ran out, or whose owner stopped heartbeating (died without a word)."""
    now = time.time()
    dead_owners = select(Worker.id).where(
        or_(Worker.heartbeat_at < now - lost_after, Worker.state.in_(("stopped", "failed")))
    )
    res = s.execute(
        update(Chunk)
        .where(
            Chunk.state == "running",
            or_(Chunk.lease_expires_at < now, Chunk.lease_owner.in_(dead_owners)),
        )
        .values(state="pending", lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    return int(res.rowcount)  # type: ignore[attr-defined]


def requeue_stale(s: Session, older_than: float, queues: list[str] | None = None) -> int:
    """Messages can vanish (kombu's SQL transport never redelivers); a duplicate is harmless, a loss is not.

    ``queues`` limits this to chunks of jobs on those queues.
    """
    where = _queued_longer_than(older_than)
    if queues is not None:
        where.append(Chunk.job_id.in_(select(Job.id).where(Job.queue.in_(queues))))
    res = s.execute(update(Chunk).where(*where).values(state="pending").execution_options(synchronize_session=False))
    return int(res.rowcount)  # type: ignore[attr-defined]


def queues_with_queued_since(s: Session, older_than: float) -> list[str]:
    """Queues holding chunks marked queued for longer than ``older_than`` seconds."""
    rows = s.execute(
        select(Job.queue)
        .join(Chunk, Chunk.job_id == Job.id)
        .where(*_queued_longer_than(older_than))
        .distinct()
    ).all()
    return sorted(q for (q,) in rows)


def _queued_longer_than(seconds: float) -> list[ColumnElement[bool]]:
    return [Chunk.state == "queued", Chunk.enqueued_at < time.time() - seconds]


def inflight_by_queue(s: Session) -> dict[str, int]:
    rows = s.execute(
        select(Job.queue, func.count())
        .join(Chunk, Chunk.job_id == Job.id)
        .where(Chunk.state.in_(("queued", "running")))
        .group_by(Job.queue)
    ).all()
    return {q: int(n) for q, n in rows}


def pending_chunks(s: Session, job_id: str, limit: int) -> list[Chunk]:
    return list(
        s.scalars(
            select(Chunk).where(Chunk.job_id == job_id, Chunk.state == "pending").order_by(Chunk.idx).limit(limit)
        )
    )


def mark_queued(s: Session, chunk_ids: list[int]) -> None:
    s.execute(
        update(Chunk)
        .where(Chunk.id.in_(chunk_ids), Chunk.state == "pending")
        .values(state="queued", enqueued_at=time.time())
        .execution_options(synchronize_session=False)
    )


def unfinished_chunks(s: Session, job_id: str) -> int:
    return int(
        s.scalar(
            select(func.count()).where(Chunk.job_id == job_id, and_(Chunk.state != "done", Chunk.state != "cancelled"))
        )
        or 0
    )

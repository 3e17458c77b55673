"""API batches: the batch lifecycle (every status write happens here) and the queries the API pages need.

validating → in_progress → finalizing → completed | expired | cancelled; validating → failed | expired |
cancelled; in_progress → cancelling → finalizing. Every transition is one conditional UPDATE whose row
count is checked (``WHERE status IN (...)``, and for the driver's steps ``lease_owner = holder``), so a
cancel racing the driver, or two drivers racing each other, can never move a batch twice: whichever
commits second finds the status changed and does nothing. A final status never changes.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tokenmill.store.clock import db_now, now_sql
from tokenmill.store.states import (
    ACTIVE_STATES,
    BATCH_FINAL,
    BATCH_OPEN,
    CHUNK_WAITING,
    BatchStatus,
    ChunkState,
    JobState,
)
from tokenmill.store.tables import ApiBatch, Chunk, Job, RequestRow, Result
from tokenmill.store.webhooks import enqueue_batch_event

WINDOW_SECONDS = {"24h": 24 * 3600.0}


# The groups under the names the API code has always used; the vocabulary is store/states.py's.
FINAL = BATCH_FINAL
OPEN = BATCH_OPEN
# Batches whose job is stored and which the driver finalizes (a finalizing one again, after a crash).
FINISHING: tuple[BatchStatus, ...] = (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING, BatchStatus.FINALIZING)
__all__ = ["FINAL", "FINISHING", "OPEN", "BatchStatus"]


def new_batch_id() -> str:
    return "batch_" + uuid.uuid4().hex[:24]


def create_batch(
    s: Session,
    *,
    owner: str,
    endpoint: str,
    input_file_id: str,
    completion_window: str,
    metadata: dict[str, str] | None,
    idempotency_key: str | None,
    window_seconds: float | None = None,
) -> ApiBatch:
    """A new batch in ``validating``; with an ``idempotency_key`` already used by this owner, that batch."""
    if idempotency_key:
        found = s.scalars(
            select(ApiBatch).where(ApiBatch.owner == owner, ApiBatch.idempotency_key == idempotency_key)
        ).first()
        if found is not None:
            return found
    now = db_now(s)  # the window is the store's clock, whichever server created or drives the batch
    batch = ApiBatch(
        id=new_batch_id(),
        owner=owner,
        idempotency_key=idempotency_key or None,
        endpoint=endpoint,
        input_file_id=input_file_id,
        completion_window=completion_window,
        status=BatchStatus.VALIDATING,
        meta=metadata or None,
        total=0,
        completed=0,
        failed=0,
        created_at=now,
        expires_at=now + (window_seconds or WINDOW_SECONDS[completion_window]),
    )
    try:
        with s.begin_nested():
            s.add(batch)
    except IntegrityError:  # the same key from a concurrent request won the race: return its batch
        found = s.scalars(
            select(ApiBatch).where(ApiBatch.owner == owner, ApiBatch.idempotency_key == idempotency_key)
        ).first()
        if found is None:
            raise
        return found
    return batch


def get_batch(s: Session, batch_id: str, owner: str) -> ApiBatch | None:
    """The batch if it exists and belongs to ``owner``: another tenant's id reads as absent."""
    b = s.get(ApiBatch, batch_id)
    return b if b is not None and b.owner == owner else None


def list_batches(s: Session, owner: str, *, limit: int, after: str | None = None) -> tuple[list[ApiBatch], bool]:
    """Newest first, cursor ``after`` (a batch id); returns (page, has_more)."""
    query = select(ApiBatch).where(ApiBatch.owner == owner)
    if after:
        anchor = get_batch(s, after, owner)
        if anchor is not None:
            query = query.where(
                (ApiBatch.created_at < anchor.created_at)
                | ((ApiBatch.created_at == anchor.created_at) & (ApiBatch.id < anchor.id))
            )
    rows = list(s.scalars(query.order_by(ApiBatch.created_at.desc(), ApiBatch.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def open_batches(s: Session) -> list[tuple[str, str]]:
    """(id, owner) of every batch the driver still moves along, oldest first."""
    rows = s.execute(
        select(ApiBatch.id, ApiBatch.owner).where(ApiBatch.status.in_(OPEN)).order_by(ApiBatch.created_at, ApiBatch.id)
    )
    return [(str(batch_id), str(owner)) for batch_id, owner in rows]


def count_by_status(s: Session) -> dict[str, int]:
    return {st: int(n) for st, n in s.execute(select(ApiBatch.status, func.count()).group_by(ApiBatch.status))}


def claim(
    s: Session, batch_id: str, holder: str, seconds: float, statuses: tuple[BatchStatus, ...] = OPEN
) -> ApiBatch | None:
    """Take (or renew) the batch's driver lease unless another live process holds it; the batch as stored.

    An UPDATE first, so on SQLite the transaction holds the write lock from its first statement and a
    cancel committed meanwhile is seen, not overwritten. The lease is the store's clock (store/clock.py):
    a server whose clock ran ahead would otherwise take a live lease of one behind.
    """
    now = now_sql(s)
    res = s.execute(
        update(ApiBatch)
        .where(
            ApiBatch.id == batch_id,
            ApiBatch.status.in_(statuses),
            or_(ApiBatch.lease_until.is_(None), ApiBatch.lease_until < now, ApiBatch.lease_owner == holder),
        )
        .values(lease_owner=holder, lease_until=now + seconds)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        return None
    return s.get(ApiBatch, batch_id, populate_existing=True)


def _move(s: Session, batch_id: str, sources: tuple[BatchStatus, ...], holder: str | None, **values: Any) -> bool:
    """The one way a batch's status changes: only from ``sources``, only by the lease ``holder`` when given."""
    where = [ApiBatch.id == batch_id, ApiBatch.status.in_(sources)]
    if holder is not None:
        where.append(ApiBatch.lease_owner == holder)
    res = s.execute(update(ApiBatch).where(*where).values(**values).execution_options(synchronize_session=False))
    return res.rowcount == 1  # type: ignore[attr-defined]


def _released(**values: Any) -> dict[str, Any]:
    return {**values, "lease_owner": None, "lease_until": None}


def release(s: Session, batch_id: str, holder: str) -> None:
    """Give the lease back early (a step that found nothing to do), so another replica need not wait it out."""
    s.execute(
        update(ApiBatch)
        .where(ApiBatch.id == batch_id, ApiBatch.lease_owner == holder)
        .values(lease_owner=None, lease_until=None)
        .execution_options(synchronize_session=False)
    )


def attach_job(s: Session, batch_id: str, holder: str, job_id: str, model: str) -> bool:
    """Validation passed and the (still ``ingesting``, invisible) job exists: record it on the batch before
    any row is stored, so a cancel from now on finds the job to stop."""
    res = s.execute(
        update(ApiBatch)
        .where(
            ApiBatch.id == batch_id,
            ApiBatch.status == BatchStatus.VALIDATING,
            ApiBatch.lease_owner == holder,
            ApiBatch.job_id.is_(None),
        )
        .values(job_id=job_id, model=model)
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1  # type: ignore[attr-defined]


def start(s: Session, batch_id: str, holder: str, total: int) -> bool:
    """validating → in_progress: every row is stored; refused once cancelled or past ``expires_at``."""
    now = db_now(s)  # expiry is judged on the store's clock
    res = s.execute(
        update(ApiBatch)
        .where(
            ApiBatch.id == batch_id,
            ApiBatch.status == BatchStatus.VALIDATING,
            ApiBatch.lease_owner == holder,
            ApiBatch.expires_at > now,
        )
        .values(_released(status=BatchStatus.IN_PROGRESS, total=total, in_progress_at=now))
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1  # type: ignore[attr-defined]


def fail(s: Session, batch_id: str, holder: str, errors: list[dict[str, Any]], total: int) -> bool:
    """validating → failed: bad lines (or a file that cannot be read); nothing runs."""
    values = _released(status=BatchStatus.FAILED, errors=errors, total=total, failed_at=time.time())
    return _final_event(s, batch_id, _move(s, batch_id, (BatchStatus.VALIDATING,), holder, **values))


def expire_validating(s: Session, batch_id: str) -> tuple[bool, str | None]:
    """validating → expired once past ``expires_at``, whoever holds the lease (an ingest still going stops at
    its next slice); (moved, the job an interrupted or running ingest made, for the caller to cancel)."""
    now = db_now(s)  # expiry is judged on the store's clock
    error = {"code": "batch_expired", "line": None, "param": None,
             "message": "the completion window ran out before the file was validated"}  # fmt: skip
    row = s.execute(
        update(ApiBatch)
        .where(ApiBatch.id == batch_id, ApiBatch.status == BatchStatus.VALIDATING, ApiBatch.expires_at <= now)
        .values(_released(status=BatchStatus.EXPIRED, errors=[error], expired_at=now))
        .returning(ApiBatch.job_id)
        .execution_options(synchronize_session=False)
    ).first()
    _final_event(s, batch_id, row is not None)
    return (row is not None, row[0] if row is not None else None)


@dataclass(frozen=True)
class Cancelled:
    """What a cancel did: the status it moved the batch to (None: nothing, it was too late or done twice)
    and the batch's job, which the caller stops in the same transaction."""

    status: BatchStatus | None
    job_id: str | None


def request_cancel(s: Session, batch_id: str) -> Cancelled:
    """validating → cancelled (any job its validation made is the caller's to cancel), in_progress →
    cancelling (the driver finalizes); finalizing, cancelling and final batches are left as they are."""
    now = time.time()
    moves: tuple[tuple[BatchStatus, BatchStatus, dict[str, Any]], ...] = (
        (BatchStatus.VALIDATING, BatchStatus.CANCELLED, _released(cancelling_at=now, cancelled_at=now)),
        (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING, {"cancelling_at": now}),
    )
    for source, target, values in moves:
        row = s.execute(
            update(ApiBatch)
            .where(ApiBatch.id == batch_id, ApiBatch.status == source)
            .values(status=target, **values)
            .returning(ApiBatch.job_id)
            .execution_options(synchronize_session=False)
        ).first()
        if row is not None:
            _final_event(s, batch_id, target == BatchStatus.CANCELLED)
            return Cancelled(target, row[0])
    return Cancelled(None, None)


def final_status(b: ApiBatch, job_state: str | None, now: float) -> BatchStatus | None:
    """Where a running batch ends, decided the same way on every pass (a finalizer that died is redone):
    cancelled once anyone asked, completed when its job finished, expired past its window."""
    if b.cancelling_at is not None:
        return BatchStatus.CANCELLED
    if job_state in (JobState.COMPLETED, JobState.COMPLETED_WITH_ERRORS):
        return BatchStatus.COMPLETED
    if now >= b.expires_at:
        return BatchStatus.EXPIRED
    if job_state == JobState.CANCELLED:  # cancelled outside the API (`tokenmill cancel`)
        return BatchStatus.CANCELLED
    return None


def begin_finalizing(s: Session, batch_id: str, holder: str, final: BatchStatus) -> bool:
    """in_progress | cancelling → finalizing (a finalizing one stays, for a finalizer that died). A batch
    cancelled outside the API records when, so :func:`final_status` stays cancelled on every later pass."""
    now = time.time()
    values: dict[str, Any] = {
        "status": BatchStatus.FINALIZING,
        "finalizing_at": func.coalesce(ApiBatch.finalizing_at, now),
    }
    if final == BatchStatus.CANCELLED:
        values["cancelling_at"] = func.coalesce(ApiBatch.cancelling_at, now)
    return _move(s, batch_id, FINISHING, holder, **values)


def finish(
    s: Session,
    batch_id: str,
    holder: str,
    status: BatchStatus,
    *,
    output_file_id: str | None,
    error_file_id: str | None,
    completed: int,
    failed: int,
    usage: dict[str, Any] | None,
) -> bool:
    """finalizing → the end state, with its files and counts, in the transaction that stored the files: the
    caller rolls the files back when this returns False, so a batch gets its output files at most once."""
    now = time.time()
    stamp = {BatchStatus.COMPLETED: "completed_at", BatchStatus.EXPIRED: "expired_at",
             BatchStatus.CANCELLED: "cancelled_at"}[status]  # fmt: skip
    values = _released(status=status, output_file_id=output_file_id, error_file_id=error_file_id,
                       completed=completed, failed=failed, usage=usage, **{stamp: now})  # fmt: skip
    return _final_event(s, batch_id, _move(s, batch_id, (BatchStatus.FINALIZING,), holder, **values))


def _final_event(s: Session, batch_id: str, moved: bool) -> bool:
    """The webhook hook: once a transition made the batch final, queue its event in that same transaction
    (a second final transition of one batch breaks the event's unique key and rolls back)."""
    if moved:
        batch = s.get(ApiBatch, batch_id, populate_existing=True)
        assert batch is not None
        enqueue_batch_event(s, batch)
    return moved


def unfinished_requests(s: Session, job_id: str, page: int = 1000) -> Iterator[RequestRow]:
    """Rows of the job with no result yet, in input order, paged (an expired batch's error lines)."""
    last = -1
    while True:
        rows = list(
            s.scalars(
                select(RequestRow)
                .outerjoin(Result, (Result.job_id == RequestRow.job_id) & (Result.seq == RequestRow.seq))
                .where(RequestRow.job_id == job_id, RequestRow.seq > last, Result.id.is_(None))
                .order_by(RequestRow.seq)
                .limit(page)
            )
        )
        if not rows:
            return
        yield from rows
        last = rows[-1].seq


def live_chunks(s: Session, job_id: str) -> int:
    """Chunks a worker still holds a live lease on: rows that may yet land after a cancel."""
    return int(
        s.scalar(
            select(func.count())
            .select_from(Chunk)
            .where(Chunk.job_id == job_id, Chunk.state == ChunkState.RUNNING, Chunk.lease_expires_at > now_sql(s))
        )
        or 0
    )


def active_job_models(s: Session) -> set[str]:
    """Models of the jobs still to run (their catalog ref, what a local worker's --model takes)."""
    rows = s.execute(select(Job.options, Job.family).where(Job.state.in_(ACTIVE_STATES))).all()
    return {str((options or {}).get("model") or family) for options, family in rows}


def waiting_chunks(s: Session) -> int:
    """Chunks no worker has yet (pending or queued), over every queue: the server's queue depth."""
    return int(s.scalar(select(func.count()).select_from(Chunk).where(Chunk.state.in_(CHUNK_WAITING))) or 0)

"""API batches: the batch lifecycle (every status write happens here) and the queries the API pages need.

validating → in_progress → finalizing → completed | expired, validating → failed, and
in_progress → cancelling → cancelled (validating → cancelled when nothing was stored yet).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from enum import Enum
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tokenmill.store.clock import db_now, now_sql
from tokenmill.store.states import ACTIVE_STATES
from tokenmill.store.tables import ApiBatch, Chunk, Job, RequestRow, Result

WINDOW_SECONDS = {"24h": 24 * 3600.0}


class BatchStatus(str, Enum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


FINAL = (BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED)
OPEN = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING, BatchStatus.CANCELLING)


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
        status=BatchStatus.VALIDATING.value,
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


def open_batch_ids(s: Session) -> list[str]:
    return list(s.scalars(select(ApiBatch.id).where(ApiBatch.status.in_([st.value for st in OPEN]))))


def count_by_status(s: Session) -> dict[str, int]:
    return {st: int(n) for st, n in s.execute(select(ApiBatch.status, func.count()).group_by(ApiBatch.status))}


def claim(
    s: Session, batch_id: str, holder: str, seconds: float, statuses: tuple[BatchStatus, ...] = OPEN
) -> ApiBatch | None:
    """Take the batch's driver lease (validation, finalizing) unless another live process holds it.

    An UPDATE first, so on SQLite the transaction holds the write lock from its first statement and a
    cancel committed meanwhile is seen, not overwritten. The lease is the store's clock (store/clock.py):
    a server whose clock ran ahead would otherwise take a live lease of one behind.
    """
    now = now_sql(s)
    res = s.execute(
        update(ApiBatch)
        .where(
            ApiBatch.id == batch_id,
            ApiBatch.status.in_([st.value for st in statuses]),
            or_(ApiBatch.lease_until.is_(None), ApiBatch.lease_until < now, ApiBatch.lease_owner == holder),
        )
        .values(lease_owner=holder, lease_until=now + seconds)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        return None
    batch = s.get(ApiBatch, batch_id)
    if batch is not None:
        s.refresh(batch)
    return batch


def release(batch: ApiBatch) -> None:
    batch.lease_owner = None
    batch.lease_until = None


def start(batch: ApiBatch, job_id: str, model: str, total: int) -> None:
    """Validation passed and the rows are stored: the job runs."""
    batch.status = BatchStatus.IN_PROGRESS.value
    batch.job_id = job_id
    batch.model = model
    batch.total = total
    batch.in_progress_at = time.time()


def fail(batch: ApiBatch, errors: list[dict[str, Any]], total: int) -> None:
    """Validation found bad lines: nothing was stored, nothing runs."""
    batch.status = BatchStatus.FAILED.value
    batch.errors = errors
    batch.total = total
    batch.failed_at = time.time()


def request_cancel(batch: ApiBatch) -> bool:
    """True when a job may need stopping; a batch still validating is cancelled outright."""
    now = time.time()
    if batch.status == BatchStatus.VALIDATING.value:
        batch.status = BatchStatus.CANCELLED.value
        batch.cancelling_at = batch.cancelled_at = now
        return False
    if batch.status == BatchStatus.IN_PROGRESS.value:
        batch.status = BatchStatus.CANCELLING.value
        batch.cancelling_at = now
        return True
    return False


def begin_finalizing(batch: ApiBatch) -> None:
    batch.status = BatchStatus.FINALIZING.value
    batch.finalizing_at = batch.finalizing_at or time.time()


def finish(
    batch: ApiBatch,
    status: BatchStatus,
    *,
    output_file_id: str | None,
    error_file_id: str | None,
    completed: int,
    failed: int,
    usage: dict[str, Any] | None,
) -> None:
    """The end state with its files and counts, in the transaction that stored the files."""
    now = time.time()
    batch.status = status.value
    batch.output_file_id = output_file_id
    batch.error_file_id = error_file_id
    batch.completed = completed
    batch.failed = failed
    batch.usage = usage
    if status == BatchStatus.COMPLETED:
        batch.completed_at = now
    elif status == BatchStatus.EXPIRED:
        batch.expired_at = now
    elif status == BatchStatus.CANCELLED:
        batch.cancelled_at = now
    release(batch)


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
            .where(Chunk.job_id == job_id, Chunk.state == "running", Chunk.lease_expires_at > now_sql(s))
        )
        or 0
    )


def active_job_models(s: Session) -> set[str]:
    """Models of the jobs still to run (their catalog ref, what a local worker's --model takes)."""
    rows = s.execute(select(Job.options, Job.family).where(Job.state.in_(ACTIVE_STATES))).all()
    return {str((options or {}).get("model") or family) for options, family in rows}


def waiting_chunks(s: Session) -> int:
    """Chunks no worker has yet (pending or queued), over every queue: the server's queue depth."""
    return int(s.scalar(select(func.count()).select_from(Chunk).where(Chunk.state.in_(("pending", "queued")))) or 0)

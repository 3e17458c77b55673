"""Chunk leases: the mechanism that makes redelivery, crashes and scale-out safe.

A worker may only generate for a chunk while it holds an unexpired lease on it; the broker's view of
the world (acked, redelivered, lost) never decides who works on what. Every chunk transition is a
function here (claim, renew, complete, release, expire, requeue, unqueue, mark queued, close answered).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from tokenmill.store.clock import now_sql
from tokenmill.store.jobs import start_job
from tokenmill.store.results import chunk_answered, fail_unanswered
from tokenmill.store.states import (
    ACTIVE_STATES,
    CHUNK_CLAIMABLE,
    CHUNK_CLOSED,
    CHUNK_INFLIGHT,
    CHUNK_WAITING,
    WORKER_GONE,
    ChunkState,
    ErrorCode,
)
from tokenmill.store.tables import Chunk, Job, Worker
from tokenmill.store.workers import count_tokens, queues_of

log = logging.getLogger(__name__)
# Lapsed claims (a worker died or lost the lease with the chunk) after which its rows are tried one at a
# time, each try recorded before it starts, so a row that kills its process fails alone (workers/isolate.py).
ISOLATE_AFTER = 2


def claim(
    s: Session,
    chunk_id: int,
    worker_id: str,
    lease_seconds: float,
    *,
    job_id: str | None = None,
    queues: list[str] | None = None,
) -> Chunk | None:
    """Take the lease if nobody holds a live one and the chunk is not finished; None otherwise.

    With ``job_id``/``queues`` the chunk must also belong to that job, and the job sit on one of those
    queues, checked in the same statement as the lease is taken (a stale or forged message cannot
    make a worker answer another job's rows, or a model it does not serve).
    """
    now = now_sql(s)
    job_ok = select(Job.id).where(Job.state.in_(ACTIVE_STATES))
    if queues is not None:
        job_ok = job_ok.where(Job.queue.in_(queues))
    where = [
        Chunk.id == chunk_id,
        Chunk.state.in_(CHUNK_CLAIMABLE),
        or_(Chunk.lease_owner.is_(None), Chunk.lease_expires_at < now, Chunk.lease_owner == worker_id),
        Chunk.job_id.in_(job_ok),
    ]
    if job_id is not None:
        where.append(Chunk.job_id == job_id)
    res = s.execute(
        update(Chunk)
        .where(*where)
        .values(
            state=ChunkState.RUNNING,
            lease_owner=worker_id,
            lease_expires_at=now + lease_seconds,
            # A claim counts as an attempt unless it is the owner taking its own live chunk again (its
            # first-claim and then the chunk's message); a clean hand-back gives the attempt back (release).
            attempts=Chunk.attempts
            + case((and_(Chunk.state == ChunkState.RUNNING, Chunk.lease_owner == worker_id), 0), else_=1),
            started_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        return None
    return s.get(Chunk, chunk_id, populate_existing=True)  # the UPDATE bypassed the identity map


@dataclass
class Claim:
    """What a worker's claim came to: a chunk to run, a refusal with its reason, or rows given up on."""

    chunk: Chunk | None = None
    job: Job | None = None
    refused: str | None = None  # why a message was dropped: it does not match this worker or this job
    exhausted: int = 0  # rows failed with chunk_attempts_exhausted (the chunk is done then)
    gave_up: bool = False  # the chunk was claimed too often: its unanswered rows failed, the chunk is done

    @property
    def isolate(self) -> bool:
        """Whether to try the chunk's rows one at a time: its workers died (or lost it) with it before."""
        return self.chunk is not None and self.chunk.attempts > ISOLATE_AFTER


def give_up_after(max_attempts: int, rows: int, max_row_attempts: int) -> int:
    """Claims of a chunk before its unanswered rows fail: ``max_attempts`` (TOKENMILL_MAX_CHUNK_ATTEMPTS),
    plus what trying its rows one at a time can take. A chunk isolated after :data:`ISOLATE_AFTER` lapses
    spends at most ``max_row_attempts`` claims per row (each claim records the try of the row it is on
    before starting it, and a row out of tries fails alone), so in practice only a poison row fails, and
    this bound is the backstop should that bookkeeping ever not advance."""
    return max_attempts + rows * max_row_attempts


def claim_for_worker(
    s: Session,
    *,
    job_id: str,
    chunk_id: int,
    worker_id: str,
    lease_seconds: float,
    max_attempts: int,
    max_row_attempts: int = 0,
) -> Claim:
    """A worker's whole claim in one transaction: verify the (job, chunk) pairing and the job's queue
    against the queues this worker registered, take the lease, start the job, and give up on a chunk
    claimed more than :func:`give_up_after` times (its unanswered rows fail; the job goes on)."""
    queues = queues_of(s, worker_id)
    chunk = claim(s, chunk_id, worker_id, lease_seconds, job_id=job_id, queues=queues)
    if chunk is None:
        return Claim(refused=_mismatch(s, job_id, chunk_id, queues))
    start_job(s, job_id)
    job = s.get(Job, job_id, populate_existing=True)
    if job is None:  # cannot happen: the claim checked the job exists; kept for the type checker
        return Claim()
    limit = give_up_after(max_attempts, chunk.last_seq - chunk.first_seq + 1, max_row_attempts)
    if chunk.attempts > limit:
        failed = fail_unanswered(
            s,
            job_id,
            chunk.first_seq,
            chunk.last_seq,
            code=ErrorCode.CHUNK_ATTEMPTS_EXHAUSTED,
            message=f"chunk {chunk.idx} was claimed {chunk.attempts} times (limit {limit}); given up",
            worker_id=worker_id,
        )
        count_tokens(s, worker_id, failed, 0)
        complete(s, chunk_id, worker_id)
        return Claim(chunk=chunk, job=job, exhausted=failed, gave_up=True)
    return Claim(chunk=chunk, job=job)


def claim_next_for_worker(
    s: Session,
    *,
    job_id: str,
    worker_id: str,
    lease_seconds: float,
    max_attempts: int,
    max_row_attempts: int = 0,
    tries: int = 4,
) -> Claim:
    """Claim the next waiting chunk of ``job_id`` without a message: how a worker keeps its batch full.

    A worker draining one chunk takes the next this way, so its engine's free slots are refilled from it
    at once instead of emptying while the chunk finishes and the next message arrives. Chunks the
    dispatcher has not sent yet go first, so messages already in the broker stay good for other workers;
    a chunk whose message is out is taken only when none is left, and that message is dropped later by
    the claim it fails. Same checks and transaction as :func:`claim_for_worker`; an empty Claim when
    there is nothing left to take (or others won every race for it), and when another job on the queue
    waits with fewer chunks running: then the task ends and the dispatcher's round robin decides.
    """
    if _others_wait_with_fewer_running(s, job_id):
        return Claim()
    candidates = list(
        s.scalars(
            select(Chunk.id)
            .where(
                Chunk.job_id == job_id,
                Chunk.state.in_(CHUNK_WAITING),
                or_(Chunk.lease_owner.is_(None), Chunk.lease_expires_at < now_sql(s)),
                Chunk.attempts < ISOLATE_AFTER,  # those are run a row at a time, by a task of their own
            )
            .order_by((Chunk.state == ChunkState.QUEUED).asc(), Chunk.idx)
            .limit(tries)
        )
    )
    for chunk_id in candidates:
        claimed = claim_for_worker(
            s, job_id=job_id, chunk_id=chunk_id, worker_id=worker_id, lease_seconds=lease_seconds,
            max_attempts=max_attempts, max_row_attempts=max_row_attempts,
        )  # fmt: skip
        if claimed.chunk is not None:
            return claimed
    return Claim()


def _others_wait_with_fewer_running(s: Session, job_id: str) -> bool:
    """Whether chaining into ``job_id`` would starve another active job on its queue (jobs share a fleet)."""
    queue = select(Job.queue).where(Job.id == job_id).scalar_subquery()
    running = func.sum(case((Chunk.state == ChunkState.RUNNING, 1), else_=0))
    waiting = func.sum(case((Chunk.state.in_(CHUNK_WAITING), 1), else_=0))
    per_job = s.execute(
        select(Chunk.job_id, running, waiting)
        .join(Job, Job.id == Chunk.job_id)
        .where(Job.queue == queue, Job.state.in_(ACTIVE_STATES), Chunk.state.in_((ChunkState.RUNNING, *CHUNK_WAITING)))
        .group_by(Chunk.job_id)
    ).all()
    # At least one: the asking task serves this job even when its last chunk was completed a moment ago.
    mine = max(1, next((int(r or 0) for j, r, _ in per_job if j == job_id), 0))
    return any(j != job_id and int(w or 0) > 0 and int(r or 0) < mine for j, r, w in per_job)


def _mismatch(s: Session, job_id: str, chunk_id: int, queues: list[str]) -> str | None:
    """Why a message cannot be this worker's to run, or None when the chunk is merely taken or finished."""
    owner = s.scalar(select(Chunk.job_id).where(Chunk.id == chunk_id))
    if owner is None:
        return f"chunk {chunk_id} does not exist"
    if owner != job_id:
        return f"chunk {chunk_id} belongs to job {owner}, not to job {job_id}"
    queue = s.scalar(select(Job.queue).where(Job.id == job_id))
    if queue is not None and queue not in queues:
        return f"job {job_id} is on queue {queue}, which this worker does not serve ({', '.join(queues) or 'none'})"
    return None


def renew(s: Session, chunk_id: int, worker_id: str, lease_seconds: float) -> bool:
    """Extend our lease; False means it was lost (expired and taken, or the job was cancelled)."""
    res = s.execute(
        update(Chunk)
        .where(Chunk.id == chunk_id, Chunk.lease_owner == worker_id, Chunk.state == ChunkState.RUNNING)
        .values(lease_expires_at=now_sql(s) + lease_seconds)
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1  # type: ignore[attr-defined]


def held_rows(s: Session, worker_id: str, job_id: str, seqs: Collection[int]) -> set[int]:
    """The rows among ``seqs`` whose chunk ``worker_id`` still holds the lease of (owner, and running).

    The same test as :func:`renew` and :func:`complete`. On Postgres the chunks stay locked (FOR SHARE)
    to the end of the caller's transaction, so no claim can take them between this check and the writes
    after it; SQLite has one writer at a time on one host, where a takeover needs a lease that already
    ran out, and the unique (job, seq) key still keeps every row once.
    """
    if not seqs:
        return set()
    chunks = s.execute(
        select(Chunk.first_seq, Chunk.last_seq)
        .where(
            Chunk.job_id == job_id,
            Chunk.first_seq <= max(seqs),
            Chunk.last_seq >= min(seqs),
            Chunk.lease_owner == worker_id,
            Chunk.state == ChunkState.RUNNING,
        )
        .with_for_update(read=True)
    ).all()
    return {seq for seq in seqs if any(first <= seq <= last for first, last in chunks)}


def complete(s: Session, chunk_id: int, worker_id: str) -> bool:
    """Mark our chunk done, only if every row of its range has a result (checked in the same statement).

    Completion is a fact the store verifies, never a count a worker kept: a batch of results that failed
    to commit while a later one succeeded must not let the chunk end with rows in neither file. A chunk we
    still hold with a row unanswered is handed back at once, so its next claim generates exactly the
    missing rows (a claim loads only unanswered rows). False in both cases, and when it is not ours.
    """
    held = (Chunk.id == chunk_id, Chunk.lease_owner == worker_id, Chunk.state == ChunkState.RUNNING)
    res = s.execute(
        update(Chunk)
        .where(*held, chunk_answered())
        .values(state=ChunkState.DONE, finished_at=now_sql(s), lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    if res.rowcount == 1:  # type: ignore[attr-defined]
        return True
    back = s.execute(
        update(Chunk)
        .where(*held)
        .values(state=ChunkState.PENDING, lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    if back.rowcount:  # type: ignore[attr-defined]
        log.warning("chunk %s: a row has no stored result; handed back so its next claim answers it", chunk_id)
    return False


def release(s: Session, chunk_id: int, worker_id: str) -> None:
    """Hand a chunk back at once (clean shutdown, cancel) instead of letting its lease run out.

    A clean hand-back is not a failure, so the claim's attempt is given back: only claims whose lease
    lapsed or whose process died count toward ``max_chunk_attempts``.
    """
    s.execute(
        update(Chunk)
        .where(Chunk.id == chunk_id, Chunk.lease_owner == worker_id, Chunk.state == ChunkState.RUNNING)
        .values(
            state=ChunkState.PENDING,
            lease_owner=None,
            lease_expires_at=None,
            attempts=case((Chunk.attempts > 0, Chunk.attempts - 1), else_=0),
        )
        .execution_options(synchronize_session=False)
    )


def expire(s: Session, lost_after: float) -> int:
    """Reopen chunks whose lease ran out, or whose owner stopped heartbeating (died without a word)."""
    now = now_sql(s)
    dead_owners = select(Worker.id).where(or_(Worker.heartbeat_at < now - lost_after, Worker.state.in_(WORKER_GONE)))
    res = s.execute(
        update(Chunk)
        .where(
            Chunk.state == ChunkState.RUNNING,
            or_(Chunk.lease_expires_at < now, Chunk.lease_owner.in_(dead_owners)),
        )
        .values(state=ChunkState.PENDING, lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    return int(res.rowcount)  # type: ignore[attr-defined]


def requeue_stale(s: Session, older_than: float, queues: list[str] | None = None) -> int:
    """Messages can vanish (kombu's SQL transport never redelivers); a duplicate is harmless, a loss is not.

    ``queues`` limits this to chunks of jobs on those queues.
    """
    where = _queued_longer_than(s, older_than)
    if queues is not None:
        where.append(Chunk.job_id.in_(select(Job.id).where(Job.queue.in_(queues))))
    res = s.execute(
        update(Chunk).where(*where).values(state=ChunkState.PENDING).execution_options(synchronize_session=False)
    )
    return int(res.rowcount)  # type: ignore[attr-defined]


def unqueue(s: Session, chunk_ids: list[int]) -> int:
    """Chunks marked queued whose message was never sent go straight back to pending."""
    res = s.execute(
        update(Chunk)
        .where(Chunk.id.in_(chunk_ids), Chunk.state == ChunkState.QUEUED)
        .values(state=ChunkState.PENDING)
        .execution_options(synchronize_session=False)
    )
    return int(res.rowcount)  # type: ignore[attr-defined]


def queues_with_queued_since(s: Session, older_than: float) -> list[str]:
    """Queues holding chunks marked queued for longer than ``older_than`` seconds."""
    rows = s.execute(
        select(Job.queue).join(Chunk, Chunk.job_id == Job.id).where(*_queued_longer_than(s, older_than)).distinct()
    ).all()
    return sorted(q for (q,) in rows)


def _queued_longer_than(s: Session, seconds: float) -> list[ColumnElement[bool]]:
    return [Chunk.state == ChunkState.QUEUED, Chunk.enqueued_at < now_sql(s) - seconds]


def inflight_by_queue(s: Session) -> dict[str, int]:
    rows = s.execute(
        select(Job.queue, func.count())
        .join(Chunk, Chunk.job_id == Job.id)
        .where(Chunk.state.in_(CHUNK_INFLIGHT))
        .group_by(Job.queue)
    ).all()
    return {q: int(n) for q, n in rows}


def waiting_on(s: Session, queues: list[str]) -> int:
    """Chunks waiting (pending or queued) for jobs on these queues."""
    if not queues:
        return 0
    return int(
        s.scalar(
            select(func.count())
            .select_from(Chunk)
            .join(Job, Job.id == Chunk.job_id)
            .where(Job.queue.in_(queues), Chunk.state.in_(CHUNK_WAITING))
        )
        or 0
    )


def pending_chunks(s: Session, job_id: str, limit: int) -> list[Chunk]:
    return list(
        s.scalars(
            select(Chunk)
            .where(Chunk.job_id == job_id, Chunk.state == ChunkState.PENDING)
            .order_by(Chunk.idx)
            .limit(limit)
        )
    )


def mark_queued(s: Session, chunk_ids: list[int]) -> None:
    s.execute(
        update(Chunk)
        .where(Chunk.id.in_(chunk_ids), Chunk.state == ChunkState.PENDING)
        .values(state=ChunkState.QUEUED, enqueued_at=now_sql(s))
        .execution_options(synchronize_session=False)
    )


def close_answered(s: Session, job_id: str) -> int:
    """Pending chunks whose every row already has a result (from the cache) need no worker: done."""
    res = s.execute(
        update(Chunk)
        .where(
            Chunk.job_id == job_id,
            Chunk.state == ChunkState.PENDING,
            chunk_answered(),
        )
        .values(state=ChunkState.DONE, finished_at=now_sql(s))
        .execution_options(synchronize_session=False)
    )
    return int(res.rowcount)  # type: ignore[attr-defined]


def unfinished_chunks(s: Session, job_id: str) -> int:
    return int(s.scalar(select(func.count()).where(Chunk.job_id == job_id, Chunk.state.notin_(CHUNK_CLOSED))) or 0)


def first_claimed_at(s: Session, job_id: str) -> float | None:
    """When a worker first took a chunk of the job (a chunk claimed again shows its latest claim)."""
    return s.scalar(select(func.min(Chunk.started_at)).where(Chunk.job_id == job_id))


def first_waiting(s: Session, queues: list[str]) -> tuple[str, int] | None:
    """(job id, chunk id) of the oldest chunk waiting (pending or queued) on one of ``queues``, for a worker
    that takes its first chunk from the store instead of waiting for its message (workers/first_claim.py).

    Only a candidate: the worker still takes it with :func:`claim_for_worker`, which checks the state,
    the lease, the job and the queue in one statement, so two workers picking the same chunk is harmless.
    A chunk with a running lease, even an expired one, is left to :func:`expire` and its message path.
    """
    if not queues:
        return None
    row = s.execute(
        select(Chunk.job_id, Chunk.id)
        .join(Job, Job.id == Chunk.job_id)
        .where(Job.queue.in_(queues), Job.state.in_(ACTIVE_STATES), Chunk.state.in_(CHUNK_WAITING))
        .order_by(Job.created_at, Chunk.idx)
        .limit(1)
    ).first()
    return (str(row[0]), int(row[1])) if row is not None else None

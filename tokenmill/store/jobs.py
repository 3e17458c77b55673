"""Jobs and their rows: ingest (streamed, bulk), lookup, progress, and the job's transitions (start,
finish, cancel, retry)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, delete, exists, func, insert, or_, select, update
from sqlalchemy.orm import Session

from tokenmill.errors import JobNotFound, StoreError
from tokenmill.rows import DatasetRow
from tokenmill.store.clock import now_sql
from tokenmill.store.results import answered, chunk_answered
from tokenmill.store.states import (
    ACTIVE_STATES,
    CHUNK_CLOSED,
    CHUNK_WAITING,
    FINAL_STATES,
    UNFINISHED_STATES,
    ChunkState,
    JobState,
    ResultStatus,
)
from tokenmill.store.tables import OPERATOR, Chunk, Job, RequestRow, Result

log = logging.getLogger(__name__)
__all__ = ["ACTIVE_STATES", "FINAL_STATES"]  # re-exported: callers that ask "is this job still going?"
INSERT_BATCH = 2000
# A chunk holds at most chunk_size rows AND about this many prompt characters (what ``prompt_chars``
# counts): a chunk of 16 huge rows was one lease of hours, and every worker that took it in turn died.
MAX_CHUNK_PROMPT_CHARS = 1 << 20


def new_job_id() -> str:
    return uuid.uuid4().hex[:16]


def create_job(
    s: Session,
    *,
    key: str,
    name: str,
    family: str,
    queue: str,
    chunk_size: int,
    pinned_variant: str | None = None,
    options: dict[str, Any] | None = None,
    ab_group: str | None = None,
    owner: str = OPERATOR,
) -> Job:
    job = Job(
        id=new_job_id(),
        owner=owner,
        key=key,
        name=name,
        family=family,
        pinned_variant=pinned_variant,
        queue=queue,
        state=JobState.INGESTING,
        chunk_size=chunk_size,
        options=options or {},
        ab_group=ab_group,
        created_at=time.time(),
        total_rows=0,
        n_chunks=0,
    )
    s.add(job)
    s.flush()
    return job


class _Chunker:
    """Cuts rows into chunks as they stream by: a new chunk when the rows or the characters run out."""

    def __init__(self, rows: int, chars: int) -> None:
        self.max_rows, self.max_chars = rows, chars
        self.spans: list[tuple[int, int]] = []  # (first_seq, last_seq) of each closed chunk
        self.first, self.n, self.chars = 0, 0, 0

    def place(self, seq: int, chars: int) -> int:
        """The chunk index for row ``seq``; a row larger than the bound gets a chunk of its own."""
        if self.n and (self.n >= self.max_rows or self.chars + chars > self.max_chars):
            self.spans.append((self.first, seq - 1))
            self.first, self.n, self.chars = seq, 0, 0
        self.n += 1
        self.chars += chars
        return len(self.spans)

    def close(self) -> list[tuple[int, int]]:
        if self.n:
            self.spans.append((self.first, self.first + self.n - 1))
            self.n = 0
        return self.spans


def _row_record(job: Job, seq: int, row: DatasetRow, chunker: _Chunker) -> dict[str, Any]:
    prompt_chars = row.prompt_chars
    return {
        "job_id": job.id,
        "seq": seq,
        "chunk_index": chunker.place(seq, prompt_chars),
        "line": row.line,
        "custom_id": row.custom_id,
        "payload": row.to_payload(),
        "prompt_chars": prompt_chars,
    }


_PAYLOAD_JSON = json.JSONEncoder(ensure_ascii=False)  # json.dumps with options builds one per call


def _copy_rows(s: Session, job: Job, rows: Iterable[DatasetRow], chunker: _Chunker) -> int:
    """Postgres: COPY inside the session's transaction — several times faster than batched INSERTs."""
    raw = s.connection().connection.driver_connection
    columns = ("job_id", "seq", "chunk_index", "line", "custom_id", "payload", "prompt_chars")
    seq = 0
    with raw.cursor() as cur, cur.copy(f"COPY requests ({', '.join(columns)}) FROM STDIN") as copy:  # type: ignore[union-attr]
        for row in rows:
            rec = _row_record(job, seq, row, chunker)
            rec["payload"] = _PAYLOAD_JSON.encode(rec["payload"])
            copy.write_row([rec[c] for c in columns])
            seq += 1
    return seq


def _insert_rows(s: Session, job: Job, rows: Iterable[DatasetRow], chunker: _Chunker) -> int:
    batch: list[dict[str, Any]] = []
    seq = 0
    for row in rows:
        batch.append(_row_record(job, seq, row, chunker))
        seq += 1
        if len(batch) >= INSERT_BATCH:
            s.execute(insert(RequestRow), batch)
            batch.clear()
    if batch:
        s.execute(insert(RequestRow), batch)
    return seq


def ingest_rows(
    s: Session, job: Job, rows: Iterable[DatasetRow], *, max_chunk_chars: int = MAX_CHUNK_PROMPT_CHARS
) -> int:
    """Stream rows into the store and cut them into chunks; memory stays bounded whatever the file size."""
    copy = s.get_bind().dialect.name == "postgresql"  # COPY streams far faster than batched INSERTs
    chunker = _Chunker(job.chunk_size, max_chunk_chars)
    seq = _copy_rows(s, job, rows, chunker) if copy else _insert_rows(s, job, rows, chunker)
    spans = chunker.close()
    for start in range(0, len(spans), INSERT_BATCH):
        s.execute(
            insert(Chunk),
            [
                {"job_id": job.id, "idx": i, "first_seq": first, "last_seq": last, "state": ChunkState.PENDING,
                 "attempts": 0}
                for i, (first, last) in enumerate(spans[start : start + INSERT_BATCH], start)
            ],
        )
    job.total_rows = seq
    job.n_chunks = len(spans)
    job.state = JobState.QUEUED if seq else JobState.COMPLETED
    if not seq:
        job.finished_at = time.time()
    return seq


def get_job(s: Session, ref: str) -> Job:
    """A job by id or unique id prefix (like git), so people can type the first few characters."""
    job = s.get(Job, ref)
    if job is not None:
        return job
    matches = list(s.scalars(select(Job).where(Job.id.like(ref.replace("%", "") + "%")).limit(2)))
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise JobNotFound(f"no job {ref!r} (see: tokenmill jobs)")
    raise JobNotFound(f"job id prefix {ref!r} is ambiguous; give more characters")


def find_resumable(s: Session, key: str) -> Job | None:
    return s.scalars(select(Job).where(Job.key == key).order_by(Job.created_at.desc()).limit(1)).first()


def list_jobs(s: Session, limit: int = 50) -> list[Job]:
    return list(s.scalars(select(Job).order_by(Job.created_at.desc()).limit(limit)))


@dataclass
class Progress:
    job_id: str
    state: str
    total: int
    done: int
    succeeded: int
    failed: int
    cached: int
    completion_tokens: int
    prompt_tokens: int
    chunks_total: int
    chunks_done: int
    chunks_running: int
    started_at: float | None
    finished_at: float | None

    @property
    def remaining(self) -> int:
        return self.total - self.done

    def to_json(self) -> dict[str, Any]:
        elapsed = ((self.finished_at or time.time()) - self.started_at) if self.started_at else 0.0
        return {
            "job": self.job_id,
            "state": self.state,
            "total": self.total,
            "done": self.done,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "cached": self.cached,
            "pending": self.remaining,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "chunks": {"total": self.chunks_total, "done": self.chunks_done, "running": self.chunks_running},
            "elapsed_s": round(elapsed, 3),
            "tokens_per_second": round(self.completion_tokens / elapsed, 2) if elapsed > 0 else 0.0,
        }


def progress(s: Session, job: Job) -> Progress:
    res = s.execute(
        select(
            Result.status,
            func.count(),
            func.coalesce(func.sum(Result.completion_tokens), 0),
            func.coalesce(func.sum(Result.prompt_tokens), 0),
            func.coalesce(func.sum(case((Result.cached, 1), else_=0)), 0),
        )
        .where(Result.job_id == job.id)
        .group_by(Result.status)
    ).all()
    counts = {status: (n, ct, pt, cached) for status, n, ct, pt, cached in res}
    chunk_counts = dict(
        s.execute(select(Chunk.state, func.count()).where(Chunk.job_id == job.id).group_by(Chunk.state)).all()
    )
    ok = counts.get(ResultStatus.SUCCEEDED, (0, 0, 0, 0))
    bad = counts.get(ResultStatus.FAILED, (0, 0, 0, 0))
    return Progress(
        job_id=job.id,
        state=job.state,
        total=job.total_rows,
        done=ok[0] + bad[0],
        succeeded=ok[0],
        failed=bad[0],
        cached=int(ok[3]),
        completion_tokens=int(ok[1]),
        prompt_tokens=int(ok[2]),
        chunks_total=job.n_chunks,
        chunks_done=int(chunk_counts.get(ChunkState.DONE, 0)),
        chunks_running=int(chunk_counts.get(ChunkState.RUNNING, 0)),
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def _transition(s: Session, job: Job | str, to: JobState, sources: Collection[JobState], **values: Any) -> bool:
    """Move a job to ``to`` only if it is still in one of ``sources``: one conditional UPDATE, row count checked.

    A transition decided on a state read earlier (the dispatcher's pass, a cancel, a worker's last chunk)
    must not overwrite one that committed in between; the WHERE clause makes the database the judge.
    """
    job_id = job if isinstance(job, str) else job.id
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_(list(sources)))
        .values(state=to, **values)
        .execution_options(synchronize_session=False)
    )
    _forget(s, job_id)
    return res.rowcount == 1  # type: ignore[attr-defined]


def _forget(s: Session, job_id: str) -> None:
    """A Job loaded before a bulk UPDATE shows old values; expire it so the next read sees the row."""
    obj = s.identity_map.get(s.identity_key(Job, job_id))
    if obj is not None:
        s.expire(obj)


def cancel_job(s: Session, job: Job | str) -> bool:
    """Stop dispatch now; workers see the state at their next row boundary. False if already final."""
    job_id = job if isinstance(job, str) else job.id
    if not _transition(s, job_id, JobState.CANCELLED, UNFINISHED_STATES, finished_at=now_sql(s)):
        return False
    s.execute(
        update(Chunk)
        .where(Chunk.job_id == job_id, Chunk.state.in_(CHUNK_WAITING))
        .values(state=ChunkState.CANCELLED)
        .execution_options(synchronize_session=False)
    )
    return True


def retry_failed(s: Session, job: Job) -> int:
    """Forget failed results and reopen only the chunks that held them; returns how many rows were failed.

    The only way a final state changes. An explicit retry is a fresh start for what it reopens: the
    chunks' claim counts and the rows' attempt counts go back to zero, or a chunk that ran out of
    attempts would fail again at once. The state flip comes first and is conditional, so a retry racing
    another retry, or a job that is no longer final, changes nothing.
    """
    state = state_of(s, job.id)
    if state is None or state not in FINAL_STATES:
        raise StoreError(f"job {job.id} is still {state}; wait for it or cancel it first")
    failed = list(s.scalars(select(Result.seq).where(Result.job_id == job.id, Result.status == ResultStatus.FAILED)))
    unfinished = state == JobState.CANCELLED
    if not failed and not unfinished:
        return 0
    if not _transition(s, job.id, JobState.QUEUED, (state,), finished_at=None):
        raise StoreError(f"job {job.id} changed state while retrying; look again (tokenmill status {job.id})")
    chunk_idx = set(  # chunks are cut by rows and by bytes: look each row's chunk up, never divide
        s.scalars(
            select(RequestRow.chunk_index)
            .where(RequestRow.job_id == job.id, RequestRow.seq.in_(failed))
            .distinct()
        )
    ) if failed else set()  # fmt: skip
    if failed:
        s.execute(delete(Result).where(Result.job_id == job.id, Result.status == ResultStatus.FAILED))
        s.execute(update(RequestRow).where(RequestRow.job_id == job.id, RequestRow.seq.in_(failed)).values(attempts=0))
    reopen = or_(Chunk.idx.in_(chunk_idx), Chunk.state != ChunkState.DONE) if unfinished else Chunk.idx.in_(chunk_idx)
    s.execute(
        update(Chunk)
        .where(Chunk.job_id == job.id, reopen)
        .values(state=ChunkState.PENDING, lease_owner=None, lease_expires_at=None, attempts=0)
        .execution_options(synchronize_session=False)
    )
    return len(failed)


def start_job(s: Session, job_id: str) -> bool:
    """queued -> running, when its first chunk is sent or claimed (whichever the store sees first)."""
    return _transition(
        s, job_id, JobState.RUNNING, (JobState.QUEUED,), started_at=func.coalesce(Job.started_at, now_sql(s))
    )


def active_jobs(s: Session) -> list[Job]:
    """Jobs the dispatcher sends chunks for, oldest first (fair share starts with the oldest)."""
    return list(s.scalars(select(Job).where(Job.state.in_(ACTIVE_STATES)).order_by(Job.created_at)))


def finish_jobs(s: Session, job_ids: Collection[str] | None = None) -> list[str]:
    """Close every active job (of ``job_ids``, when given) whose every row has a result; returns those closed.

    Completion is a fact the store checks, not a count a process kept: a job is finished only in a
    statement that sees no open chunk *and* as many results as rows. An active job whose chunks are all
    closed while a row has no result (a history that should not happen) is not closed: the chunks
    holding the missing rows are reopened, so the job answers them instead of ending short.

    A worker task calls it for its job as it ends, so a job ends with its last chunk rather than at the
    dispatcher's next pass; the dispatcher's pass closes the rest.
    """
    open_chunk = exists().where(Chunk.job_id == Job.id, Chunk.state.notin_(CHUNK_CLOSED))
    query = select(Job.id, Job.state).where(Job.state.in_(ACTIVE_STATES), ~open_chunk)
    if job_ids is not None:
        query = query.where(Job.id.in_(list(job_ids)))
    closed: list[str] = []
    for job_id, state in s.execute(query).all():
        failed = exists().where(Result.job_id == Job.id, Result.status == ResultStatus.FAILED)
        res = s.execute(
            update(Job)
            .where(
                Job.id == job_id,
                Job.state == state,
                ~open_chunk,
                answered(Job.id, 0, Job.total_rows) >= Job.total_rows,
            )
            .values(
                state=case((failed, JobState.COMPLETED_WITH_ERRORS), else_=JobState.COMPLETED),
                finished_at=now_sql(s),
            )
            .execution_options(synchronize_session=False)
        )
        _forget(s, str(job_id))
        if res.rowcount == 1:  # type: ignore[attr-defined]
            closed.append(str(job_id))
        elif reopened := _reopen_unanswered(s, str(job_id)):
            log.error("job %s: every chunk closed but %d held unanswered rows; reopened them", job_id, reopened)
    return closed


def _reopen_unanswered(s: Session, job_id: str) -> int:
    res = s.execute(
        update(Chunk)
        .where(
            Chunk.job_id == job_id,
            Chunk.state == ChunkState.DONE,
            ~chunk_answered(),
        )
        .values(state=ChunkState.PENDING, lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    return int(res.rowcount)  # type: ignore[attr-defined]


def is_unfinished(s: Session, job_id: str) -> bool:
    """True while the job can still change by itself (ingesting, queued or running); False if gone."""
    state = state_of(s, job_id)
    return state is not None and state in UNFINISHED_STATES


def state_of(s: Session, job_id: str) -> JobState | None:
    """The job's state alone, one indexed lookup: what `run` polls between its fuller progress reads."""
    state = s.scalar(select(Job.state).where(Job.id == job_id))
    return None if state is None else JobState(state)


def is_cancelled(s: Session, job_id: str) -> bool:
    """What a worker asks between rows: stop if the job was cancelled (or deleted)."""
    state = state_of(s, job_id)
    return state is None or state == JobState.CANCELLED


def ab_partners(s: Session, job: Job) -> list[Job]:
    """The other jobs of ``job``'s A/B group, oldest first."""
    if job.ab_group is None:
        return []
    return list(s.scalars(select(Job).where(Job.ab_group == job.ab_group, Job.id != job.id).order_by(Job.created_at)))


def load_rows(s: Session, job_id: str, first_seq: int, last_seq: int) -> list[RequestRow]:
    return list(
        s.scalars(
            select(RequestRow)
            .where(RequestRow.job_id == job_id, RequestRow.seq >= first_seq, RequestRow.seq <= last_seq)
            .order_by(RequestRow.seq)
        )
    )


def add_slot_use(s: Session, job_id: str, steps: int, slots: int, filled: int) -> None:
    """Add one task's decode steps and slot fill to the job (once per task, not per row or step)."""
    if steps <= 0:
        return
    s.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            decode_steps=Job.decode_steps + steps,
            slot_steps=Job.slot_steps + slots,
            filled_slot_steps=Job.filled_slot_steps + filled,
        )
        .execution_options(synchronize_session=False)
    )

"""Ingest in short transactions: a job's rows go in a few thousand at a time while the job stays ``ingesting``.

One transaction for a whole file held SQLite's only write lock for as long as the file took to store:
every other writer (workers' results, heartbeats, the dispatcher's lease checks) waited behind it, and
past the busy timeout failed. Here each transaction stores one slice of rows; the job is invisible to
dispatch meanwhile (only queued and running jobs have their chunks sent or claimed, and it has no chunks
yet), and :func:`seal` adds the chunks and makes it ``queued`` in one last short transaction.

Slices commit in order, so the rows stored are always seqs ``0..n-1``: a process that dies mid-ingest
leaves a job that :func:`rows_stored` says how to resume (the same rows, replayed through the same
chunker, from row ``n``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from tokenmill.store.jobs import _PAYLOAD_JSON, INSERT_BATCH, MAX_CHUNK_PROMPT_CHARS, _Chunker
from tokenmill.store.states import ChunkState, JobState
from tokenmill.store.tables import Chunk, Job, RequestRow

COLUMNS = ("job_id", "seq", "chunk_index", "line", "custom_id", "payload", "prompt_chars")


@dataclass(frozen=True)
class StagedRow:
    """One validated row as it will be stored (what ``DatasetRow.to_payload`` gives, and where it came from)."""

    line: int
    custom_id: str
    prompt_chars: int
    payload: dict[str, Any]


class Placer:
    """Numbers rows and cuts them into chunks as they stream by, the same way on a resumed ingest."""

    def __init__(self, job_id: str, chunk_size: int, max_chunk_chars: int = MAX_CHUNK_PROMPT_CHARS) -> None:
        self.job_id = job_id
        self.chunker = _Chunker(chunk_size, max_chunk_chars)
        self.seq = 0

    def record(self, row: StagedRow) -> dict[str, Any]:
        rec = {
            "job_id": self.job_id,
            "seq": self.seq,
            "chunk_index": self.chunker.place(self.seq, row.prompt_chars),
            "line": row.line,
            "custom_id": row.custom_id,
            "payload": row.payload,
            "prompt_chars": row.prompt_chars,
        }
        self.seq += 1
        return rec

    def spans(self) -> list[tuple[int, int]]:
        return self.chunker.close()


def rows_stored(s: Session, job_id: str) -> int:
    """How many rows a (possibly interrupted) ingest has stored: the seq to resume from."""
    last = s.scalar(select(func.max(RequestRow.seq)).where(RequestRow.job_id == job_id))
    return 0 if last is None else int(last) + 1


def append_rows(s: Session, records: Iterable[dict[str, Any]]) -> None:
    """One slice of rows, in the caller's (short) transaction; COPY on Postgres."""
    recs = list(records)
    if not recs:
        return
    if s.get_bind().dialect.name != "postgresql":
        s.execute(insert(RequestRow), recs)
        return
    raw = s.connection().connection.driver_connection
    with raw.cursor() as cur, cur.copy(f"COPY requests ({', '.join(COLUMNS)}) FROM STDIN") as copy:  # type: ignore[union-attr]
        for rec in recs:
            copy.write_row([_PAYLOAD_JSON.encode(rec[c]) if c == "payload" else rec[c] for c in COLUMNS])


def seal(s: Session, job_id: str, spans: list[tuple[int, int]], total: int) -> bool:
    """ingesting → queued (completed when empty), with its chunks; False (and nothing changed for the caller
    to keep: roll back) when the job is no longer ingesting, e.g. cancelled meanwhile."""
    now = time.time()
    res = s.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.INGESTING)
        .values(
            state=JobState.QUEUED if total else JobState.COMPLETED,
            total_rows=total,
            n_chunks=len(spans),
            finished_at=None if total else now,
        )
        .execution_options(synchronize_session=False)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        return False
    for start in range(0, len(spans), INSERT_BATCH):
        s.execute(
            insert(Chunk),
            [
                {"job_id": job_id, "idx": i, "first_seq": first, "last_seq": last, "state": ChunkState.PENDING,
                 "attempts": 0}
                for i, (first, last) in enumerate(spans[start : start + INSERT_BATCH], start)
            ],
        )  # fmt: skip
    return True

"""Results: written idempotently, read back for export and for the result cache."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from tokenmill.store.tables import RequestRow, Result


def write_result(s: Session, values: dict[str, Any]) -> bool:
    """Insert unless a result for (job, row) exists. False means someone else already answered the row."""
    values = {"created_at": time.time(), **values}
    dialect = s.get_bind().dialect.name
    stmt: Any
    if dialect == "postgresql":
        stmt = postgresql.insert(Result).values(**values).on_conflict_do_nothing(constraint="uq_results_job_seq")
    else:
        stmt = sqlite.insert(Result).values(**values).on_conflict_do_nothing(index_elements=["job_id", "seq"])
    return s.execute(stmt.returning(Result.id)).first() is not None


def done_seqs(s: Session, job_id: str, first_seq: int, last_seq: int) -> set[int]:
    return set(
        s.scalars(select(Result.seq).where(Result.job_id == job_id, Result.seq >= first_seq, Result.seq <= last_seq))
    )


def cached(s: Session, request_hash: str) -> Result | None:
    return s.scalars(
        select(Result).where(Result.request_hash == request_hash, Result.status == "succeeded").limit(1)
    ).first()


def iter_results(s: Session, job_id: str, batch: int = 1000) -> Iterator[tuple[Result, RequestRow]]:
    """Results in input order, paged so exporting a million rows keeps memory flat."""
    last = -1
    while True:
        rows = s.execute(
            select(Result, RequestRow)
            .join(RequestRow, (RequestRow.job_id == Result.job_id) & (RequestRow.seq == Result.seq))
            .where(Result.job_id == job_id, Result.seq > last)
            .order_by(Result.seq)
            .limit(batch)
        ).all()
        if not rows:
            return
        yield from ((result, request) for result, request in rows)
        last = rows[-1][0].seq

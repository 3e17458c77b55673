"""The result cache's reads and writes; the request identity itself is :func:`tokenmill.cache.request_hash`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tokenmill.store.db import Store
from tokenmill.store.paging import keyset_pages
from tokenmill.store.results import cache_hit, origin_of, write_result
from tokenmill.store.states import ResultStatus
from tokenmill.store.tables import Job, RequestRow, Result
from tokenmill.store.workers import count_tokens


def copy_hit(s: Session, job_id: str, seq: int, custom_id: str, h: str, worker_id: str | None) -> bool:
    """Answer row ``seq`` of ``job_id`` from an earlier job's identical request; False when there is none.

    Only the same owner's answers are copied (:func:`cache_hit`). The copy's ``cached_from`` names the job
    that *generated* the answer, also when the hit was itself a copy, so a chain of cached runs still leads
    back to the timings and worker that produced the text; its body's ``id`` is this row's own.
    """
    owner = select(Job.owner).where(Job.id == job_id).scalar_subquery()
    hit = cache_hit(s, h, owner)
    if hit is None or hit.job_id == job_id:
        return False
    written = write_result(
        s,
        {
            "job_id": job_id,
            "seq": seq,
            "custom_id": custom_id,
            "status": ResultStatus.SUCCEEDED,
            "body": own_ids(hit.body, job_id, seq),
            "worker_id": worker_id,
            "variant": hit.variant,
            "timings": {**(hit.timings or {}), "cached_from": origin_of(hit), "queue_ms": 0.0},
            "prompt_tokens": hit.prompt_tokens,
            "completion_tokens": hit.completion_tokens,
            "cached": True,
            "attempts": 0,
            "request_hash": h,
        },
    )
    if written and worker_id is not None:
        count_tokens(s, worker_id, 1, 0)
    return True


def own_ids(body: dict[str, Any] | None, job_id: str, seq: int) -> dict[str, Any] | None:
    """A copied body with the copying row's id (``chatcmpl-<job>-<seq>``, as a generated one has), never the
    id of the job it was copied from."""
    if body is None or not isinstance(body.get("id"), str):
        return body
    old = str(body["id"])
    kind = "resp_" if old.startswith("resp_") else old.split("-", 1)[0] + "-"  # a Response: resp_<job>-<seq>
    return {**body, "id": f"{kind}{job_id}-{seq}"}


def unanswered_pages(store: Store, job_id: str, *, page: int) -> Iterator[list[RequestRow]]:
    """A job's rows that have no result yet, in input order; one short session per page, so the caller
    can write answers between pages."""
    done = select(Result.seq).where(Result.job_id == job_id)
    stmt = select(RequestRow).where(RequestRow.job_id == job_id, RequestRow.seq.not_in(done))
    for rows in keyset_pages(store, stmt, RequestRow.seq, size=page, key_of=lambda row: int(row[0].seq)):
        yield [row[0] for row in rows]

"""The result cache: a temperature-0 request already answered by the same weights is not generated again.

Identity = sha256 of (model file sha256, endpoint, messages/prompt, sampling params). Cached rows are
copies marked ``cached`` with ``cached_from`` naming the job that generated them.
"""

from __future__ import annotations

import hashlib
import json
import time

from sqlalchemy import func, select, update

from tokenmill.rows import EMBEDDINGS, DatasetRow
from tokenmill.store import Store
from tokenmill.store import results as store_results
from tokenmill.store.tables import Chunk, RequestRow, Result
from tokenmill.store.workers import count_tokens


def request_hash(model_id: str, row: DatasetRow) -> str | None:
    """Identity of a deterministic request: temperature-0 rows, and every embeddings row (no sampling)."""
    if row.endpoint != EMBEDDINGS and row.params.temperature != 0:
        return None
    payload = {k: v for k, v in row.to_payload().items() if k != "source"}
    blob = json.dumps([model_id, payload], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def copy_cached(store: Store, job_id: str, seq: int, row: DatasetRow, h: str, worker_id: str | None) -> bool:
    """Answer one row from an earlier job's identical request; False when there is none."""
    with store.session() as s:
        hit = store_results.cached(s, h)
        if hit is None or hit.job_id == job_id:
            return False
        written = store_results.write_result(
            s,
            {
                "job_id": job_id,
                "seq": seq,
                "custom_id": row.custom_id,
                "status": "succeeded",
                "body": hit.body,
                "worker_id": worker_id,
                "variant": hit.variant,
                "timings": {**(hit.timings or {}), "cached_from": hit.job_id, "queue_ms": 0.0},
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


def prefill(store: Store, job_id: str, model_id: str, page: int = 1000) -> int:
    """Answer every cacheable row of a job before any worker starts; returns how many were served."""
    served = 0
    last = -1
    while True:
        with store.session() as s:
            done = select(Result.seq).where(Result.job_id == job_id)
            reqs = list(
                s.scalars(
                    select(RequestRow)
                    .where(RequestRow.job_id == job_id, RequestRow.seq > last, RequestRow.seq.not_in(done))
                    .order_by(RequestRow.seq)
                    .limit(page)
                )
            )
        if not reqs:
            return served
        for req in reqs:
            row = DatasetRow.from_payload(req.line, req.custom_id, req.payload)
            h = request_hash(model_id, row)
            if h is not None and copy_cached(store, job_id, req.seq, row, h, None):
                served += 1
        last = reqs[-1].seq


def close_answered_chunks(store: Store, job_id: str) -> int:
    """Chunks whose every row already has a result need no worker: mark them done."""
    answered = (
        select(func.count())
        .select_from(Result)
        .where(Result.job_id == Chunk.job_id, Result.seq >= Chunk.first_seq, Result.seq <= Chunk.last_seq)
        .scalar_subquery()
    )
    with store.session() as s:
        res = s.execute(
            update(Chunk)
            .where(Chunk.job_id == job_id, Chunk.state == "pending", answered == Chunk.last_seq - Chunk.first_seq + 1)
            .values(state="done", finished_at=time.time())
            .execution_options(synchronize_session=False)
        )
        return int(res.rowcount)  # type: ignore[attr-defined]

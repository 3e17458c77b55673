"""The result cache: a temperature-0 request already answered by the same weights is not generated again.

Identity = sha256 of (model file sha256, endpoint, messages/prompt, sampling params). Scope: one owner
(a tenant's jobs, or the operator's); an answer is never copied into another owner's job. Cached rows
are copies marked ``cached`` with ``cached_from`` naming the job that generated them (the original job,
also when the hit was itself a copy) and their own ids in the body. The SQL side lives in
:mod:`tokenmill.store.cache`.
"""

from __future__ import annotations

import hashlib
import json

from tokenmill.config import DEFAULT_ENGINE
from tokenmill.rows import EMBEDDINGS, DatasetRow
from tokenmill.store import Store, leases
from tokenmill.store import cache as store_cache


def weights_identity(model_id: str, engine: str) -> str:
    """What a cached answer was made by: the weights and, for any engine but llama.cpp, the engine too, so
    a stub's ``echo:`` answers are never served to a real run (llama.cpp's identity is the bare weights,
    as before, so existing caches stay valid)."""
    return model_id if engine == DEFAULT_ENGINE else f"{model_id}+{engine}"


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
        return store_cache.copy_hit(s, job_id, seq, row.custom_id, h, worker_id)


def prefill(store: Store, job_id: str, model_id: str, page: int = 1000) -> int:
    """Answer every cacheable row of a job before any worker starts; returns how many were served."""
    served = 0
    for reqs in store_cache.unanswered_pages(store, job_id, page=page):
        for req in reqs:
            row = DatasetRow.from_payload(req.line, req.custom_id, req.payload)
            h = request_hash(model_id, row)
            if h is not None and copy_cached(store, job_id, req.seq, row, h, None):
                served += 1
    return served


def close_answered_chunks(store: Store, job_id: str) -> int:
    """Chunks whose every row already has a result need no worker: mark them done."""
    with store.session() as s:
        return leases.close_answered(s, job_id)

"""``/v1/batches``: create (idempotent with ``Idempotency-Key``: the same key and body return the same batch,
the same key with another body is a 409), retrieve, list, cancel.

The endpoints only record intent; validation, running and finalizing happen in the batch driver
(tokenmill/server/driver.py), so a request never waits on a 50,000-line file.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from tokenmill.server.auth import tenant
from tokenmill.server.errors import ApiError, not_found
from tokenmill.server.schemas import BatchCreate, BatchList, BatchObject, RequestCounts
from tokenmill.store import Store
from tokenmill.store import batches as store_batches
from tokenmill.store import files as store_files
from tokenmill.store import jobs as store_jobs
from tokenmill.store.db import Session
from tokenmill.store.states import BATCH_RUNNING
from tokenmill.store.tables import ApiBatch, Job

router = APIRouter(prefix="/v1/batches", tags=["batches"])
Tenant = Annotated[str, Depends(tenant)]


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


COUNTS_TTL = 1.0
_counts: dict[str, tuple[float, RequestCounts]] = {}


def _live_counts(s: Session, job_id: str) -> RequestCounts | None:
    """A running job's counts, read at most once a second per process: hundreds of clients polling
    the same batch cost one aggregate query a second, not one each (counts move per row anyway)."""
    now = time.monotonic()
    hit = _counts.get(job_id)
    if hit is not None and now - hit[0] < COUNTS_TTL:
        return hit[1]
    job = s.get(Job, job_id)
    if job is None:
        return None
    p = store_jobs.progress(s, job)
    counts = RequestCounts(total=p.total, completed=p.succeeded, failed=p.failed)
    if len(_counts) > 10_000:
        _counts.clear()
    _counts[job_id] = (now, counts)
    return counts


def _view(s: Session, b: ApiBatch) -> BatchObject:
    """Live counts while the job runs (from its results), the recorded ones once the batch is final."""
    counts = None
    if b.job_id and b.status in BATCH_RUNNING:
        counts = _live_counts(s, b.job_id)
    return BatchObject.of(b, counts)


@router.post("", response_model=BatchObject)
def create(
    request: Request,
    owner: Tenant,
    spec: BatchCreate,
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
) -> BatchObject:
    settings = request.app.state.settings
    with _store(request).session() as s:
        f = store_files.get_file(s, spec.input_file_id, owner)
        if f is None:
            raise ApiError(404, f"No such file: {spec.input_file_id!r}", param="input_file_id", code="not_found")
        if f.purpose != "batch":
            raise ApiError(400, f"file {f.id} has purpose {f.purpose!r}, not 'batch'", param="input_file_id")
        b = store_batches.create_batch(
            s,
            owner=owner,
            endpoint=spec.endpoint,
            input_file_id=spec.input_file_id,
            completion_window=spec.completion_window,
            metadata=spec.metadata,
            idempotency_key=idempotency_key,
            window_seconds=settings.batch_window_seconds,
        )
        digest = _digest(spec)
        if b.request_digest is None:  # this request made it (or it predates digests: the first body seen wins)
            b.request_digest = digest
        elif b.request_digest != digest:
            raise ApiError(
                409,
                "Idempotency-Key was already used with a different request body",
                param="Idempotency-Key",
                code="idempotency_key_reused",
            )
        return _view(s, b)


def _digest(spec: BatchCreate) -> str:
    """The request as the batch records it: the same key with another body is another request, refused."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@router.get("", response_model=BatchList)
def list_batches(
    request: Request,
    owner: Tenant,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> BatchList:
    with _store(request).session() as s:
        page, more = store_batches.list_batches(s, owner, limit=limit, after=after)
        data = [_view(s, b) for b in page]
    return BatchList(
        data=data, has_more=more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )


@router.get("/{batch_id}", response_model=BatchObject)
async def retrieve(request: Request, owner: Tenant, batch_id: str) -> Response:
    """The hot path (clients poll it): a view rendered in the last second is served from memory without a
    thread hop or a query, so hundreds of pollers cost about one store read per batch per second."""
    key = (owner, batch_id)
    hit = _views.get(key)
    if hit is not None and time.monotonic() - hit[0] < VIEW_TTL:
        return Response(hit[1], media_type="application/json")
    body = await run_in_threadpool(_render, _store(request), owner, batch_id)
    _views[key] = (time.monotonic(), body)
    if len(_views) > 10_000:
        _views.clear()
    return Response(body, media_type="application/json")


VIEW_TTL = 1.0
_views: dict[tuple[str, str], tuple[float, bytes]] = {}


def _render(store: Store, owner: str, batch_id: str) -> bytes:
    with store.session() as s:
        b = store_batches.get_batch(s, batch_id, owner)
        if b is None:
            raise not_found("batch", batch_id)
        return _view(s, b).model_dump_json().encode()


@router.post("/{batch_id}/cancel", response_model=BatchObject)
def cancel(request: Request, owner: Tenant, batch_id: str) -> BatchObject:
    with _store(request).session() as s:
        b = cancel_batch(s, owner, batch_id)
        _views.pop((owner, batch_id), None)  # this replica shows the cancel at once; others within VIEW_TTL
        return _view(s, b)


def cancel_batch(s: Session, owner: str, batch_id: str) -> ApiBatch:
    """The status moves by one conditional UPDATE (store/batches.py), so a cancel racing the driver either
    lands before its next step, which then finds the batch cancelled, or finds it already moved on; the
    batch's job, if validation made one, is cancelled in the same transaction."""
    if store_batches.get_batch(s, batch_id, owner) is None:
        raise not_found("batch", batch_id)
    moved = store_batches.request_cancel(s, batch_id)
    if moved.status is not None and moved.job_id:
        job = s.get(Job, moved.job_id)
        if job is not None:
            store_jobs.cancel_job(s, job)
    b = s.get(ApiBatch, batch_id, populate_existing=True)
    assert b is not None
    if moved.status is None and b.status in store_batches.FINAL:
        raise ApiError(400, f"batch {b.id} is already {b.status}", param="batch_id", code="batch_finished")
    return b

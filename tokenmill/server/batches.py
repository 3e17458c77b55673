"""``/v1/batches``: create (idempotent with ``Idempotency-Key``), retrieve, list, cancel.

The endpoints only record intent; validation, running and finalizing happen in the batch driver
(tokenmill/server/driver.py), so a request never waits on a 50,000-line file.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from sqlalchemy.orm import Session

from tokenmill.server.auth import tenant
from tokenmill.server.errors import ApiError, not_found
from tokenmill.server.schemas import BatchCreate, BatchList, BatchObject, RequestCounts
from tokenmill.store import Store
from tokenmill.store import batches as store_batches
from tokenmill.store import files as store_files
from tokenmill.store import jobs as store_jobs
from tokenmill.store.tables import ApiBatch, Job

router = APIRouter(prefix="/v1/batches", tags=["batches"])
Tenant = Annotated[str, Depends(tenant)]


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _view(s: Session, b: ApiBatch) -> BatchObject:
    """Live counts while the job runs (from its results), the recorded ones once the batch is final."""

    counts = None
    if b.job_id and b.status in ("in_progress", "cancelling", "finalizing"):
        job = s.get(Job, b.job_id)
        if job is not None:
            p = store_jobs.progress(s, job)
            counts = RequestCounts(total=p.total, completed=p.succeeded, failed=p.failed)
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
        return _view(s, b)


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
def retrieve(request: Request, owner: Tenant, batch_id: str) -> BatchObject:
    with _store(request).session() as s:
        b = store_batches.get_batch(s, batch_id, owner)
        if b is None:
            raise not_found("batch", batch_id)
        return _view(s, b)


@router.post("/{batch_id}/cancel", response_model=BatchObject)
def cancel(request: Request, owner: Tenant, batch_id: str) -> BatchObject:
    with _store(request).session() as s:
        b = store_batches.get_batch(s, batch_id, owner)
        if b is None:
            raise not_found("batch", batch_id)
        if b.status in [st.value for st in store_batches.FINAL]:
            raise ApiError(400, f"batch {b.id} is already {b.status}", param="batch_id", code="batch_finished")
        if store_batches.request_cancel(b) and b.job_id:
            job = s.get(Job, b.job_id)
            if job is not None:
                store_jobs.cancel_job(s, job)
        return _view(s, b)

"""``/healthz`` and ``/metrics``: the server's liveness and Prometheus figures, named like the workers'."""

from __future__ import annotations

import contextlib
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tokenmill.errors import ServiceUnavailable
from tokenmill.server.auth import CALLER, Caller, operator
from tokenmill.store import Store
from tokenmill.store import batches as store_batches
from tokenmill.store import schedulers as store_schedulers

router = APIRouter(tags=["health"])


class ServerMetrics:
    """One registry per app: scraped figures read the store lazily, at most every two seconds."""

    def __init__(self, store: Store) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "tokenmill_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "tokenmill_http_request_duration_seconds", "HTTP request latency", ["route"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )  # fmt: skip
        self.batches = Gauge("tokenmill_batches", "API batches by status", ["status"], registry=r)
        self.queue_depth = Gauge("tokenmill_queue_depth", "Chunks waiting (pending or queued)", registry=r)
        self.store = store
        self._read_at = 0.0

    def refresh(self) -> None:
        if time.monotonic() - self._read_at < 2.0:
            return
        with self.store.session() as s:
            counts = store_batches.count_by_status(s)
            depth = store_batches.waiting_chunks(s)
        for status in store_batches.BatchStatus:
            self.batches.labels(status=status.value).set(counts.get(status.value, 0))
        self.queue_depth.set(float(depth or 0))
        self._read_at = time.monotonic()


@router.get("/healthz")
def healthz(request: Request) -> JSONResponse:
    """Open to anyone (load balancers send no key), so it says only up or down; the reason names the
    database's host, user and name, and the driver's words: an operator's key is needed to see it."""
    try:
        request.app.state.store.ping()
    except ServiceUnavailable as exc:
        who = request.scope.get(CALLER)
        detail = {"reason": str(exc)} if isinstance(who, Caller) and who.operator else {}
        return JSONResponse({"status": "unavailable", **detail}, status_code=503)
    with request.app.state.store.session() as s:
        schedulers = store_schedulers.health(s, request.app.state.settings.lost_after)
    if any(h.alive and h.failing_for is not None for h in schedulers):  # nobody is sending chunks
        return JSONResponse({"status": "unavailable", "reason": "the dispatcher is failing"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/metrics", dependencies=[Depends(operator)])
def metrics(request: Request) -> Response:
    """Every tenant's activity in one view (batches by status, request rates): the operator's, so it needs an
    admin key once keys are configured (Prometheus sends it as ``authorization: {credentials: ...}``)."""
    m: ServerMetrics = request.app.state.metrics
    with contextlib.suppress(Exception):  # a scrape must not fail because the store blinked: last figures
        m.refresh()
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

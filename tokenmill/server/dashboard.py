"""The web dashboard at ``/``: jobs with live progress, the workers, and a page per job.

Pages are rendered on the server from the Jinja2 templates the report uses (autoescaping on, so a job
named ``<script>`` is shown as text); a small script polls the JSON endpoints below and rewrites the
numbers with ``textContent``. No front-end build step, nothing loaded from outside the server. Every
read goes through ``tokenmill.store`` functions, so the dashboard works on any replica of the store.
These routes stay out of the OpenAPI document: they are for people, the API is ``/v1``.

Who sees what: once keys are configured every route here needs one (the gate asks a browser for it with
HTTP Basic, the key as the password; scripts send ``Authorization: Bearer``). A tenant's key shows that
tenant's jobs only, and no workers (their hosts and current jobs are the operator's); an admin key shows
everything, as an open server (no keys, loopback only) does.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from tokenmill import __version__, templates
from tokenmill.config import Settings
from tokenmill.errors import NoResultsYet
from tokenmill.output import jsonl_lines
from tokenmill.server.auth import Caller, caller
from tokenmill.store import Store, views
from tokenmill.store.views import JobView, WorkerView

if TYPE_CHECKING:
    from tokenmill.report.data import Plot, Report

router = APIRouter(include_in_schema=False)
Viewer = Annotated[Caller, Depends(caller)]
POLL_MS = 1000
JOBS_SHOWN = 50
_PLOTS = threading.Lock()  # matplotlib's rc_context is process-global: one report drawn at a time
KNOWN_STATES = frozenset(
    {"completed", "completed_with_errors", "cancelled", "running", "queued", "ingesting", "failed", "expired"}
)
WORKER_STATES = frozenset({"busy", "ready", "lost", "failed"})
NO_STORE = {"Cache-Control": "no-store"}


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _lost_after(request: Request) -> float:
    """A worker silent for three heartbeats is shown as lost (the dispatcher's rule)."""
    settings: Settings = request.app.state.settings
    return settings.lost_after


def _page(name: str, **context: Any) -> HTMLResponse:
    html = templates.render(
        name, states=KNOWN_STATES, worker_states=WORKER_STATES, poll_ms=POLL_MS, version=__version__, **context
    )
    return HTMLResponse(html, headers=NO_STORE)


def _owner(viewer: Caller) -> str | None:
    """The owner whose jobs this viewer may see; None: everyone's."""
    return None if viewer.operator else viewer.owner


def _job(store: Store, job_id: str, viewer: Caller) -> JobView | None:
    """The job, or None when it does not exist or is another tenant's (the two read the same)."""
    with store.session() as s:
        return views.job_view(s, job_id, owner=_owner(viewer))


def _jobs(store: Store, viewer: Caller) -> list[JobView]:
    with store.session() as s:
        return views.recent_jobs(s, JOBS_SHOWN, owner=_owner(viewer))


def _workers(request: Request, viewer: Caller) -> list[WorkerView]:
    if not viewer.operator:
        return []
    with _store(request).session() as s:
        return views.workers(s, _lost_after(request))


def _missing(job_id: str) -> JSONResponse:
    return JSONResponse({"error": {"message": f"no job {job_id}", "code": "job_not_found"}}, status_code=404)


@router.get("/", response_class=HTMLResponse)
def index(request: Request, viewer: Viewer) -> HTMLResponse:
    jobs = _jobs(_store(request), viewer)
    workers = _workers(request, viewer)
    return _page("dashboard_index.html", jobs=jobs, workers=workers, operator=viewer.operator)


@router.get("/dashboard/api/jobs")
def api_jobs(request: Request, viewer: Viewer) -> JSONResponse:
    jobs = _jobs(_store(request), viewer)
    return JSONResponse({"jobs": [j.to_json() for j in jobs]}, headers=NO_STORE)


@router.get("/dashboard/api/workers")
def api_workers(request: Request, viewer: Viewer) -> JSONResponse:
    workers = _workers(request, viewer)
    return JSONResponse({"workers": [w.to_json() for w in workers]}, headers=NO_STORE)


@router.get("/dashboard/api/jobs/{job_id}")
def api_job(request: Request, viewer: Viewer, job_id: str) -> JSONResponse:
    job = _job(_store(request), job_id, viewer)
    return _missing(job_id) if job is None else JSONResponse(job.to_json(), headers=NO_STORE)


def _report(store: Store, job_id: str) -> tuple[Report | None, list[Plot]]:
    """The report's summary and figures, or (None, []) while no row has finished."""
    from tokenmill.report import data, plots  # matplotlib loads on the first job page, not at start

    try:
        report = data.load_report(store, job_id)
    except NoResultsYet:
        return None, []
    with _PLOTS:
        return report, plots.render_all(report.job)


@router.get("/dashboard/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, viewer: Viewer, job_id: str) -> HTMLResponse:
    store = _store(request)
    job = _job(store, job_id, viewer)
    if job is None:
        page = _page("dashboard_missing.html", job_id=job_id)
        page.status_code = 404
        return page
    from tokenmill.report import html

    report, figures = _report(store, job.id)
    return _page("dashboard_job.html", job=job, report=report, figures=[html.figure(p) for p in figures])


def _download(request: Request, viewer: Caller, job_id: str, *, errors: bool) -> Response:
    store = _store(request)
    job = _job(store, job_id, viewer)
    if job is None:
        return _missing(job_id)
    kind = "errors" if errors else "results"
    return StreamingResponse(
        jsonl_lines(store, job.id, errors=errors),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": f'attachment; filename="{job.id}.{kind}.jsonl"', **NO_STORE},
    )


@router.get("/dashboard/jobs/{job_id}/results.jsonl")
def download_results(request: Request, viewer: Viewer, job_id: str) -> Response:
    return _download(request, viewer, job_id, errors=False)


@router.get("/dashboard/jobs/{job_id}/errors.jsonl")
def download_errors(request: Request, viewer: Viewer, job_id: str) -> Response:
    return _download(request, viewer, job_id, errors=True)


@router.get("/dashboard/jobs/{job_id}/report.html", response_class=HTMLResponse)
def full_report(request: Request, viewer: Viewer, job_id: str) -> Response:
    """The same self-contained page `tokenmill report` writes, to keep or mail."""
    from tokenmill.report import html

    store = _store(request)
    job = _job(store, job_id, viewer)
    if job is None:
        return _missing(job_id)
    report, figures = _report(store, job.id)
    if report is None:
        return JSONResponse({"error": {"message": f"job {job.id} has no results yet", "code": "no_results"}}, 409)
    page = html.render(report, figures)
    disposition = f'attachment; filename="{job.id}.report.html"'
    return HTMLResponse(page, headers={"Content-Disposition": disposition, **NO_STORE})


@router.get("/dashboard/static/dashboard.js")
def script() -> Response:
    return Response(templates.source("dashboard.js"), media_type="text/javascript")

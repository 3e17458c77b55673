"""Read-only views for the web dashboard: recent jobs with their progress, and the worker registry.

The dashboard polls these every second or two from every open browser tab, so a page of jobs costs two
grouped queries (jobs, then result counts for those jobs), not a query per job.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from tokenmill.store.clock import db_now
from tokenmill.store.tables import Job, Result, Worker
from tokenmill.store.workers import effective_state

FINAL_STATES = ("completed", "completed_with_errors", "cancelled", "failed", "expired")


@dataclass(frozen=True)
class JobView:
    """One job's live progress. ``tokens_per_second`` and ``eta_s`` are measured since the job started."""

    id: str
    name: str
    state: str
    model: str
    total: int
    done: int
    succeeded: int
    failed: int
    completion_tokens: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    now: float

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def elapsed_s(self) -> float:
        if self.started_at is None:
            return 0.0
        return max((self.finished_at or self.now) - self.started_at, 0.0)

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else (100.0 if self.final else 0.0)

    @property
    def eta_s(self) -> float | None:
        """Remaining rows at the row rate so far; None until there is a rate to extrapolate from."""
        if self.final or not self.done or self.elapsed_s <= 0:
            return None
        return (self.total - self.done) / (self.done / self.elapsed_s)

    def to_json(self) -> dict[str, Any]:
        eta = self.eta_s
        return {
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "model": self.model,
            "total": self.total,
            "done": self.done,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "percent": round(self.percent, 1),
            "completion_tokens": self.completion_tokens,
            "tokens_per_second": round(self.tokens_per_second, 1),
            "elapsed_s": round(self.elapsed_s, 1),
            "eta_s": None if eta is None else round(eta, 1),
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "final": self.final,
        }


Counts = tuple[int, int, int]
_FINAL_COUNTS: OrderedDict[tuple[str, str, float | None], Counts] = OrderedDict()
_FINAL_LOCK = threading.Lock()  # the server reads from a thread pool
FINAL_CACHE_SIZE = 1024


def _counts(s: Session, job_ids: list[str]) -> dict[str, Counts]:
    """(succeeded, failed, completion tokens of succeeded rows) per job, in one grouped query."""
    if not job_ids:
        return {}
    ok = Result.status == "succeeded"
    rows = s.execute(
        select(
            Result.job_id,
            func.coalesce(func.sum(case((ok, 1), else_=0)), 0),
            func.coalesce(func.sum(case((ok, 0), else_=1)), 0),
            func.coalesce(func.sum(case((ok, Result.completion_tokens), else_=0)), 0),
        )
        .where(Result.job_id.in_(job_ids))
        .group_by(Result.job_id)
    ).all()
    return {job_id: (int(a), int(b), int(c)) for job_id, a, b, c in rows}


def _view(job: Job, counts: Counts, now: float) -> JobView:
    succeeded, failed, tokens = counts
    return JobView(
        id=job.id,
        name=job.name,
        state=job.state,
        model=job.pinned_variant or job.family,
        total=job.total_rows,
        done=succeeded + failed,
        succeeded=succeeded,
        failed=failed,
        completion_tokens=tokens,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        now=now,
    )


def _final_key(job: Job) -> tuple[str, str, float | None] | None:
    return (job.id, job.state, job.finished_at) if job.state in FINAL_STATES else None


def _progress_counts(s: Session, jobs: list[Job]) -> dict[str, Counts]:
    """Counts for ``jobs``; a finished job's are remembered, so a list of big finished jobs is not recounted
    on every poll. The key holds its state and finish time: a retry reopens the job and changes both."""
    known: dict[str, Counts] = {}
    with _FINAL_LOCK:
        for job in jobs:
            key = _final_key(job)
            if key is not None and key in _FINAL_COUNTS:
                known[job.id] = _FINAL_COUNTS[key]
    counted = _counts(s, [j.id for j in jobs if j.id not in known])
    with _FINAL_LOCK:
        for job in jobs:
            key = _final_key(job)
            if key is not None and job.id in counted:
                _FINAL_COUNTS[key] = counted[job.id]
                _FINAL_COUNTS.move_to_end(key)
        while len(_FINAL_COUNTS) > FINAL_CACHE_SIZE:
            _FINAL_COUNTS.popitem(last=False)
    return {**counted, **known}


def recent_jobs(s: Session, limit: int = 50, *, owner: str | None = None) -> list[JobView]:
    """The newest jobs first (``owner``'s only, when given), each with its progress."""
    query = select(Job) if owner is None else select(Job).where(Job.owner == owner)
    jobs = list(s.scalars(query.order_by(Job.created_at.desc()).limit(limit)))
    counts = _progress_counts(s, jobs)
    now = time.time()
    return [_view(j, counts.get(j.id, (0, 0, 0)), now) for j in jobs]


def job_view(s: Session, job_id: str, *, owner: str | None = None) -> JobView | None:
    """One job by its full id (a URL names it exactly; prefixes are for people typing); another owner's job
    (when ``owner`` is given) reads as absent."""
    job = s.get(Job, job_id)
    if job is None or (owner is not None and job.owner != owner):
        return None
    return _view(job, _progress_counts(s, [job]).get(job.id, (0, 0, 0)), time.time())


@dataclass(frozen=True)
class WorkerView:
    """A worker as the dashboard lists it; ``state`` is ``lost`` when its heartbeats stopped."""

    id: str
    name: str
    host: str
    state: str
    variant: str | None
    device: str | None
    n_seq: int
    n_threads: int
    current_job: str | None
    rows_done: int
    tokens_generated: int
    heartbeat_at: float
    now: float

    @property
    def load(self) -> str:
        """What the worker is doing now, in words: its slots and the job it is working on."""
        if self.state == "busy" and self.current_job:
            return f"busy on {self.current_job} ({self.n_seq} slots)"
        if self.state == "busy":
            return f"busy ({self.n_seq} slots)"
        return "idle" if self.state == "ready" else self.state

    @property
    def heartbeat_age_s(self) -> float:
        return max(self.now - self.heartbeat_at, 0.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "host": self.host,
            "state": self.state,
            "variant": self.variant,
            "device": self.device,
            "n_seq": self.n_seq,
            "n_threads": self.n_threads,
            "current_job": self.current_job,
            "load": self.load,
            "rows_done": self.rows_done,
            "tokens_generated": self.tokens_generated,
            "heartbeat_at": self.heartbeat_at,
            "heartbeat_age_s": round(self.heartbeat_age_s, 1),
        }


def workers(s: Session, lost_after: float, *, include_stopped: bool = False) -> list[WorkerView]:
    """Workers by host; stopped ones are left out unless asked for (a long-lived fleet accumulates them)."""
    now = db_now(s)  # heartbeats are the store's time, whatever the server's clock says
    query = select(Worker).order_by(Worker.host, Worker.started_at)
    if not include_stopped:
        query = query.where(Worker.state != "stopped")
    return [
        WorkerView(
            id=w.id,
            name=w.name,
            host=w.host,
            state=effective_state(w, lost_after, now),
            variant=w.variant,
            device=w.device,
            n_seq=w.n_seq,
            n_threads=w.n_threads,
            current_job=w.current_job,
            rows_done=w.rows_done,
            tokens_generated=w.tokens_generated,
            heartbeat_at=w.heartbeat_at,
            now=now,
        )
        for w in s.scalars(query)
    ]

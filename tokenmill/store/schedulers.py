"""Scheduler registry: each dispatch loop says it is alive, and says so when it keeps failing.

A dispatcher that dies or keeps failing leaves jobs looking merely slow; with its heartbeat and its last
error in the store, ``tokenmill status``/``workers`` and ``/healthz`` can name the cause. Times are the
database's clock, like every other liveness time (:mod:`tokenmill.store.clock`).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import ColumnElement, delete, func, select, update
from sqlalchemy.orm import Session

from tokenmill.store.clock import db_now, now_sql
from tokenmill.store.tables import Scheduler

MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class SchedulerHealth:
    id: str
    host: str
    alive: bool
    failing_for: float | None  # seconds it has been failing, or None when its last pass worked
    error: str | None


def beat(s: Session, scheduler_id: str, *, host: str, pid: int, error: str | None = None) -> None:
    """Record a pass: ``error`` None after one that worked, else what the failing pass raised (masked)."""
    now = now_sql(s)
    error = error[:MAX_ERROR_CHARS] if error else None
    values = {"beat_at": now, "error": error}
    res = s.execute(
        update(Scheduler)
        .where(Scheduler.id == scheduler_id)
        .values(**values, failing_since=None if error is None else _failing_since(now))
        .execution_options(synchronize_session=False)
    )
    if res.rowcount == 0:  # type: ignore[attr-defined]
        t = db_now(s)
        s.add(Scheduler(id=scheduler_id, host=host, pid=pid, started_at=t, beat_at=t, error=error,
                        failing_since=t if error else None))  # fmt: skip


def _failing_since(now: ColumnElement[float]) -> ColumnElement[float]:
    return func.coalesce(Scheduler.failing_since, now)


def remove(s: Session, scheduler_id: str) -> None:
    """A scheduler that stops cleanly takes its row away (a lost one is shown as lost until then)."""
    s.execute(delete(Scheduler).where(Scheduler.id == scheduler_id).execution_options(synchronize_session=False))


def health(s: Session, lost_after: float) -> list[SchedulerHealth]:
    """Every scheduler seen, newest first: alive (beat within ``lost_after``), failing, and why."""
    now = db_now(s)
    rows = s.scalars(select(Scheduler).order_by(Scheduler.beat_at.desc())).all()
    return [
        SchedulerHealth(
            id=r.id,
            host=r.host,
            alive=r.beat_at >= now - lost_after,
            failing_for=(now - r.failing_since) if r.failing_since is not None else None,
            error=r.error,
        )
        for r in rows
    ]

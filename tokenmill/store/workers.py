"""Worker registry: what each worker process advertises and whether it is still alive."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tokenmill.store.clock import db_now, now_sql
from tokenmill.store.states import WORKER_GONE, WORKER_SERVING, WorkerState
from tokenmill.store.tables import Worker


def register(s: Session, **fields: Any) -> None:
    """Create or update this worker's row; a ``state`` given is checked against :class:`WorkerState`."""
    if "state" in fields:
        fields["state"] = _stored_state(fields["state"])
    now = db_now(s)
    existing = s.get(Worker, fields["id"])
    if existing is None:
        s.add(Worker(started_at=now, heartbeat_at=now, **fields))
    else:
        for k, v in fields.items():
            setattr(existing, k, v)
        existing.heartbeat_at = now


def heartbeat(s: Session, worker_id: str, **fields: Any) -> None:
    """Say this worker is alive, and update what it shows (state, current job and chunk)."""
    if "state" in fields:
        fields["state"] = _stored_state(fields["state"])
    s.execute(
        update(Worker)
        .where(Worker.id == worker_id)
        .values(heartbeat_at=now_sql(s), **fields)
        .execution_options(synchronize_session=False)
    )


def set_state(s: Session, worker_id: str, state: WorkerState | str, error: str | None = None) -> None:
    """starting -> ready <-> busy -> stopped | failed (a plain string is accepted if it names a state)."""
    heartbeat(s, worker_id, state=_stored_state(state), error=error)


def _stored_state(state: WorkerState | str) -> WorkerState:
    value = WorkerState(state)  # ValueError for a state that does not exist
    if value == WorkerState.LOST:
        raise ValueError("'lost' is derived from a silent heartbeat and never stored")
    return value


def count_tokens(s: Session, worker_id: str, rows: int, tokens: int) -> None:
    s.execute(
        update(Worker)
        .where(Worker.id == worker_id)
        .values(rows_done=Worker.rows_done + rows, tokens_generated=Worker.tokens_generated + tokens)
        .execution_options(synchronize_session=False)
    )


def queues_of(s: Session, worker_id: str) -> list[str]:
    """The queues this worker registered (empty for an unknown worker)."""
    return list(s.scalar(select(Worker.queues).where(Worker.id == worker_id)) or [])


def list_workers(s: Session) -> list[Worker]:
    return list(s.scalars(select(Worker).order_by(Worker.host, Worker.started_at)))


def effective_state(w: Worker, lost_after: float, now: float) -> str:
    """A worker that stopped heartbeating without saying so is shown as lost.

    ``now`` is the store's clock (:func:`~tokenmill.store.clock.db_now`), as ``heartbeat_at`` is: a host
    whose clock runs ahead would otherwise show a live fleet as lost, one behind a dead worker as alive.
    """
    if w.state in WORKER_GONE:
        return w.state
    return WorkerState.LOST if w.heartbeat_at < now - lost_after else w.state


def live_serving(s: Session, queue: str, lost_after: float) -> int:
    now = now_sql(s)
    workers = s.scalars(select(Worker).where(Worker.state.in_(WORKER_SERVING), Worker.heartbeat_at >= now - lost_after))
    return sum(1 for w in workers if queue in (w.queues or []))


def mark_stopped(s: Session, host: str, pids: list[int]) -> None:
    """Record processes this host killed itself, so they show as stopped rather than lost."""
    if pids:
        s.execute(
            update(Worker)
            .where(Worker.host == host, Worker.pid.in_(pids), Worker.state != WorkerState.FAILED)
            .values(state=WorkerState.STOPPED)
            .execution_options(synchronize_session=False)
        )

"""Worker registry: what each worker process advertises and whether it is still alive."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tokenmill.store.tables import Worker


def register(s: Session, **fields: Any) -> None:
    now = time.time()
    existing = s.get(Worker, fields["id"])
    if existing is None:
        s.add(Worker(started_at=now, heartbeat_at=now, **fields))
    else:
        for k, v in fields.items():
            setattr(existing, k, v)
        existing.heartbeat_at = now


def heartbeat(s: Session, worker_id: str, **fields: Any) -> None:
    s.execute(
        update(Worker)
        .where(Worker.id == worker_id)
        .values(heartbeat_at=time.time(), **fields)
        .execution_options(synchronize_session=False)
    )


def set_state(s: Session, worker_id: str, state: str, error: str | None = None) -> None:
    heartbeat(s, worker_id, state=state, error=error)


def count_tokens(s: Session, worker_id: str, rows: int, tokens: int) -> None:
    s.execute(
        update(Worker)
        .where(Worker.id == worker_id)
        .values(rows_done=Worker.rows_done + rows, tokens_generated=Worker.tokens_generated + tokens)
        .execution_options(synchronize_session=False)
    )


def list_workers(s: Session) -> list[Worker]:
    return list(s.scalars(select(Worker).order_by(Worker.host, Worker.started_at)))


def effective_state(w: Worker, lost_after: float, now: float | None = None) -> str:
    """A worker that stopped heartbeating without saying so is shown as lost."""
    now = time.time() if now is None else now
    if w.state in ("stopped", "failed"):
        return w.state
    return "lost" if w.heartbeat_at < now - lost_after else w.state


def live_serving(s: Session, queue: str, lost_after: float) -> int:
    now = time.time()
    workers = s.scalars(
        select(Worker).where(Worker.state.in_(("ready", "busy")), Worker.heartbeat_at >= now - lost_after)
    )
    return sum(1 for w in workers if queue in (w.queues or []))


def mark_stopped(s: Session, host: str, pids: list[int]) -> None:
    """Record processes this host killed itself, so they show as stopped rather than lost."""
    if pids:
        s.execute(
            update(Worker)
            .where(Worker.host == host, Worker.pid.in_(pids), Worker.state != "failed")
            .values(state="stopped")
            .execution_options(synchronize_session=False)
        )

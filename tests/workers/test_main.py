"""`tokenmill worker`: what it tells the store about itself while it starts."""

from __future__ import annotations

import time

from sqlalchemy import select

from tests.conftest import STUB_ARGS, WORKER_ENV, Procs, wait_for
from tokenmill.config import Settings
from tokenmill.store import Store
from tokenmill.store.tables import Worker


def _worker(store: Store, name: str) -> Worker | None:
    with store.session() as s:
        return s.scalars(select(Worker).where(Worker.name == name)).first()


def _start(procs: Procs, settings: Settings, name: str) -> None:
    args = ("worker", *STUB_ARGS, "--model", "smollm2-135m-instruct", "--threads", "1", "--name", name)
    procs.start(settings, *args, env=WORKER_ENV, name=name)


def test_worker_is_ready_only_once_celery_consumes(settings: Settings, store: Store, procs: Procs) -> None:
    """A loaded model is not yet a worker taking messages: Celery needs its broker first."""
    _start(procs, settings.with_(broker_url="redis://127.0.0.1:1/0"), "no-broker")  # nothing listens there
    wait_for(lambda: (w := _worker(store, "no-broker")) is not None and w.variant is not None, 60, "the load", procs)
    loaded = _worker(store, "no-broker")
    time.sleep(3)  # Celery starts in about a second against a broker it can reach
    w = _worker(store, "no-broker")
    assert loaded is not None and w is not None
    assert w.state == "starting", w.state
    assert w.heartbeat_at > loaded.heartbeat_at  # alive meanwhile: waiting for a broker is not being lost

    _start(procs, settings, "with-broker")  # the embedded SQL broker
    wait_for(lambda: (w := _worker(store, "with-broker")) is not None and w.state == "ready", 60, "ready", procs)

"""tokenmill's kombu SQL transport: the embedded broker that several local worker processes share."""

from __future__ import annotations

import multiprocessing as mp
from collections import Counter
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

from kombu import Connection

from tokenmill.celery_app import SQLChannel

PROCESSES = 4
QUEUES = 60


def _declare_in_lockstep(url: str, barrier: Barrier, results: Any) -> None:
    """Child process: declare the same queues as the other children, each at the same moment."""
    import tokenmill.celery_app  # noqa: F401  (maps sqla:// to tokenmill's transport in this process)

    errors: list[str] = []
    with Connection(url) as conn:
        channel = conn.default_channel
        for i in range(QUEUES):
            barrier.wait(timeout=30)
            try:
                channel._get_or_create(f"tm.q{i}")
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    results.put(errors)


def test_processes_declaring_the_same_queue_at_once_all_succeed(tmp_path: Path) -> None:
    """Local workers start together: kombu's own channel lets all but one of them die on the queue row's
    unique constraint (or on "table already exists") now and then; tokenmill's must not."""
    url = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    children = [ctx.Process(target=_declare_in_lockstep, args=(url, barrier, results)) for _ in range(PROCESSES)]
    for child in children:
        child.start()
    errors = Counter(e for _ in children for e in results.get(timeout=120))
    for child in children:
        child.join(timeout=30)
    assert [child.exitcode for child in children] == [0] * PROCESSES
    assert not errors, errors
    with Connection(url) as conn:
        channel = conn.default_channel
        assert isinstance(channel, SQLChannel)
        names = [q.name for q in channel.session.query(channel.queue_cls)]
    assert sorted(names) == sorted(f"tm.q{i}" for i in range(QUEUES))  # one row each, none twice


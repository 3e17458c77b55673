"""A chunk whose workers died with it before: its rows tried one at a time, each try recorded first.

A row that crashes its process (a grammar or prompt that trips the engine, memory it cannot have) used to
take its chunk down with it claim after claim, until the chunk ran out of attempts and every bystander in
it failed with ``chunk_attempts_exhausted``. Once a chunk has lapsed :data:`~tokenmill.store.leases.
ISOLATE_AFTER` times, its task runs here instead: one row per engine call, the row's try stored (committed)
*before* it starts and its answer committed before the next begins. A death then costs the row in flight
one of its ``max_row_attempts`` tries and nothing else, and the row that has used them all fails alone
with ``worker_died`` on the next claim, without being tried again.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Protocol

from tokenmill.engine import Engine
from tokenmill.errors import WorkerDied
from tokenmill.rows import DatasetRow
from tokenmill.workers.feed import ChunkFeed
from tokenmill.workers.ledger import Ledger
from tokenmill.workers.writer import ResultWriter

log = logging.getLogger(__name__)


class IsolationHost(Protocol):
    engine: Engine
    writer: ResultWriter

    def count_attempt(self, job_id: str, seq: int) -> int: ...


def run_isolated(rt: IsolationHost, feed: ChunkFeed, ledger: Ledger, rows: list[DatasetRow], max_tries: int) -> None:
    """Serve ``rows`` (the chunk's unanswered rows, already adopted by ``feed``) one at a time."""
    todo = deque(rows)
    while todo and ledger.stop_reason is None:
        row = todo.popleft()
        seq = feed.seq_of(row)
        tries = ledger.attempts[seq] = rt.count_attempt(ledger.job_id, seq)  # committed before the try
        if tries > max_tries:
            feed.on_done(row, WorkerDied(f"tried {tries - 1} times (the limit), worker processes dying with it in "
                                         "flight; not tried again"))  # fmt: skip
        else:
            rt.engine.generate([row], feed.on_done, lambda: ledger.stop_reason is not None)
            todo.extendleft(feed.take_retries())
        rt.writer.flush()  # this row's answer is stored before the next row can take the process down

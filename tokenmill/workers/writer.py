"""Group commit of results: a worker's finished rows are stored by a thread, in batches, off the decode loop.

Writing one result per transaction cost a commit (an fsync on SQLite, a round trip on Postgres) and a
worker-counter UPDATE per row, inside the engine's callback, so ``llama_decode`` waited on the store and a
fleet topped out at a few hundred results/s. Here the callback only enqueues; this thread stores up to
``batch_rows`` rows (or what arrived within ``batch_ms`` of the oldest) in one multi-row INSERT and bumps
the worker's counters once for the batch. Exactly-once still rests on the unique (job, seq) constraint.
The queue is bounded (two batches), so a store slower than the engine slows the engine instead of
growing memory, and a kill -9 loses at most those uncommitted rows. A chunk is completed in the
transaction that commits its last outstanding row (:class:`tokenmill.workers.ledger.Ledger` says which
rows are outstanding; :func:`tokenmill.store.leases.complete` checks it again), so a batch that fails to
commit leaves its chunk open, and the chunk's next claim generates exactly the rows that never arrived.
Each batch is stored only while this worker still holds its chunk's lease, checked (and on Postgres
locked) in the batch's own transaction: a worker cut off from the store past its lease writes nothing
for that chunk when the path heals (tests/reliability/test_partition.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from tokenmill.store import Session, Store, leases
from tokenmill.store import results as store_results
from tokenmill.store import workers as store_workers
from tokenmill.store.db import log_reason
from tokenmill.workers.ledger import Ledger

log = logging.getLogger(__name__)


@dataclass
class _Row:
    values: dict[str, Any]
    tokens: int
    ledger: Ledger | None


class _Flush:
    """A marker: everything queued before it is committed (or has failed) once ``done`` is set."""

    def __init__(self) -> None:
        self.done = threading.Event()


@dataclass
class _Complete:
    """A marker: close the ledger's chunks that have nothing outstanding, with the rows queued before it."""

    ledger: Ledger


_CLOSE = object()


class ResultWriter:
    """One per worker process; :meth:`put` from the engine callback, :meth:`flush` before completing a chunk."""

    def __init__(self, store: Store, worker_id: str, *, batch_rows: int, batch_ms: float) -> None:
        self.store = store
        self.worker_id = worker_id
        self.batch_rows = max(1, batch_rows)
        self.batch_s = max(0.0, batch_ms) / 1000.0
        self.batches = 0  # transactions committed, for tests and metrics
        self.dropped = 0  # results not stored because this worker no longer held their chunk's lease
        self._queue: queue.Queue[object] = queue.Queue(maxsize=2 * self.batch_rows)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="tokenmill-result-writer", daemon=True)
        self._thread.start()

    def put(self, values: dict[str, Any], tokens: int, ledger: Ledger | None = None) -> None:
        """Queue one result row (blocks while two batches already wait: backpressure, not memory growth).

        With a ``ledger``, the row is marked stored there once committed, and a chunk it was the last
        outstanding row of is completed in the same transaction.
        """
        self._queue.put(_Row(values, tokens, ledger))

    def close_empty(self, ledger: Ledger) -> None:
        """Complete the ledger's chunks with no row outstanding, after every row queued before this call."""
        self._queue.put(_Complete(ledger))

    def flush(self) -> None:
        """Wait until every row queued so far is committed; re-raise what a failed batch raised.

        A failed batch's rows are gone from the buffer, and their chunks stay open (the ledger still
        counts them outstanding): the task hands those chunks back, and their next claim writes the rows.
        """
        marker = _Flush()
        self._queue.put(marker)
        while not marker.done.wait(1.0):
            if not self._thread.is_alive():  # closed: nothing will ever commit what is queued
                raise RuntimeError("the result writer is closed")
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is queued and stop the thread (a warm shutdown keeps the rows it generated)."""
        if self._thread.is_alive():
            self._queue.put(_CLOSE)
            self._thread.join(timeout)

    def _loop(self) -> None:
        closing = False
        while not closing:
            first = self._queue.get()
            if first is _CLOSE:
                return
            batch: list[_Row] = []
            markers: list[_Flush | _Complete] = []
            self._take(first, batch, markers)
            deadline = time.monotonic() + self.batch_s
            while len(batch) < self.batch_rows and not markers:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _CLOSE:
                    closing = True
                    break
                self._take(item, batch, markers)
            self._commit(batch, [m for m in markers if isinstance(m, _Complete)])
            for marker in markers:
                if isinstance(marker, _Flush):
                    marker.done.set()

    @staticmethod
    def _take(item: object, batch: list[_Row], markers: list[_Flush | _Complete]) -> None:
        if isinstance(item, _Flush | _Complete):
            markers.append(item)
        elif isinstance(item, _Row):
            batch.append(item)

    def _commit(self, batch: list[_Row], markers: list[_Complete]) -> None:
        if not batch and not markers:
            return
        tokens = {(r.values["job_id"], r.values["seq"]): r.tokens for r in batch}
        by_job: dict[str, list[int]] = {}
        for r in batch:
            by_job.setdefault(r.values["job_id"], []).append(r.values["seq"])
        ledgers = {id(r.ledger): r.ledger for r in batch if r.ledger is not None}
        ledgers.update({id(m.ledger): m.ledger for m in markers})
        lost: dict[str, list[int]] = {}
        closing: dict[int, list[int]] = {}  # id(ledger) -> chunks this commit completes
        stored: dict[int, list[int]] = {}

        def write() -> None:
            with self.store.session() as s:
                # A worker that lost its lease (cut off past it, its chunk claimed by another) stops writing:
                # rows it generated since belong to the chunk's next owner, whose commit decides the chunk.
                held = {
                    (job, q) for job, seqs in by_job.items() for q in leases.held_rows(s, self.worker_id, job, seqs)
                }
                lost.clear()
                for job, seqs in by_job.items():
                    if missing := [q for q in seqs if (job, q) not in held]:
                        lost[job] = missing
                rows = [r.values for r in batch if (r.values["job_id"], r.values["seq"]) in held]
                inserted = store_results.write_results(s, rows) if rows else set()
                if inserted:
                    store_workers.count_tokens(s, self.worker_id, len(inserted), sum(tokens[k] for k in inserted))
                self._close_chunks(s, batch, held, ledgers, stored, closing)

        try:
            self.store.retrying(write)
            self.batches += 1
        except BaseException as exc:  # this thread must outlive any error; the chunk's flush reports it
            for key, ledger in ledgers.items():
                ledger.reopen(closing.get(key, []))
            log.warning(
                "storing %d results failed: %s (their chunks stay open; their next claim answers them)",
                len(batch), log_reason(exc),
            )  # fmt: skip
            self._error = exc
            return
        for key, ledger in ledgers.items():
            ledger.stored(stored.get(key, []), closing.get(key, []))
        for job, seqs in lost.items():
            log.warning("lease lost: %d results of job %s (rows %d-%d) not stored; the chunk's next owner answers "
                        "them", len(seqs), job, min(seqs), max(seqs))  # fmt: skip
            self.dropped += len(seqs)

    def _close_chunks(
        self,
        s: Session,
        batch: list[_Row],
        held: set[tuple[str, int]],
        ledgers: dict[int, Ledger],
        stored: dict[int, list[int]],
        closing: dict[int, list[int]],
    ) -> None:
        """In the batch's transaction: complete every chunk whose last outstanding row this batch stores."""
        stored.clear()
        closing.clear()
        for r in batch:
            if r.ledger is not None and (r.values["job_id"], r.values["seq"]) in held:
                stored.setdefault(id(r.ledger), []).append(r.values["seq"])
        for key, ledger in ledgers.items():
            chunks = ledger.finishing(stored.get(key, [])) + ledger.empty_chunks()
            closing[key] = chunks
            for chunk_id in chunks:
                if not leases.complete(s, chunk_id, self.worker_id):
                    log.info("chunk %s was no longer ours to complete (lease lost, job cancelled, or a row missing)",
                             chunk_id)  # fmt: skip


"""Continuous batching across chunks: the rows of every chunk a worker task holds, fed to one engine call.

A task starts from the chunk its message named. Once fewer rows wait than the engine has slots, the
engine asks for more (:data:`tokenmill.engine.Refill`), and a thread claims the job's next chunk from the
store (its own lease, :func:`tokenmill.store.leases.claim_next_for_worker`) and loads its rows while
decoding goes on, so slots are refilled the step they free instead of emptying at every chunk boundary.

Each chunk keeps its own meaning: it is completed in the writer's transaction that commits its last
outstanding row (the task's :class:`~tokenmill.workers.ledger.Ledger` is the one record of which rows
are outstanding); cancel, shutdown and a lost lease stop every chunk held, and those not finished are
handed back. Rows that failed with attempts left come back through the same refill, ahead of new chunks.
"""

from __future__ import annotations

import functools
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from tokenmill.cache import request_hash
from tokenmill.config import Settings, mask_text
from tokenmill.engine import Generation
from tokenmill.errors import RowRefused
from tokenmill.rows import DatasetRow
from tokenmill.store import Store, leases
from tokenmill.store import jobs as store_jobs
from tokenmill.store import results as store_results
from tokenmill.store.tables import Chunk, Job
from tokenmill.workers.ledger import Ledger
from tokenmill.workers.metrics import WorkerMetrics
from tokenmill.workers.writer import ResultWriter


class TaskHost(Protocol):
    """What the feed needs from its worker (:class:`tokenmill.workers.runtime.WorkerRuntime`)."""

    store: Store
    settings: Settings
    worker_id: str
    model_id: str
    metrics: WorkerMetrics
    writer: ResultWriter

    @property
    def stopping(self) -> str | None: ...

    def report_exhausted(self, claim: leases.Claim) -> None: ...

    def serve_cached(self, job: Job, row: DatasetRow, seq: int, h: str) -> bool: ...

    def count_attempt(self, job_id: str, seq: int) -> int: ...

    def write_failure(
        self, job: Job, row: DatasetRow, seq: int, exc: Exception, attempt: int, ledger: Ledger | None = None
    ) -> None: ...

    def write_success(
        self,
        job: Job,
        row: DatasetRow,
        seq: int,
        gen: Generation,
        queue_ms: float,
        attempt: int,
        h: str | None,
        ledger: Ledger | None = None,
    ) -> None: ...


log = logging.getLogger(__name__)


@dataclass
class ChunkOutcome:
    claimed: bool
    generated: int = 0
    cached: int = 0
    failed: int = 0
    chunks: int = 0  # chunks this task served: the one its message named, and those it claimed after it
    stopped: str | None = None  # "cancelled" | "lease_lost" | "shutdown" | "store_full"


@dataclass
class _Opened:
    """A claimed chunk's rows still to generate, read off the engine thread."""

    chunk: Chunk
    rows: list[tuple[int, DatasetRow]]
    attempts: dict[int, int]
    cached: int


class ChunkFeed:
    """One task's rows: the first chunk's, then each next chunk's as the engine asks (see module doc)."""

    def __init__(self, rt: TaskHost, job: Job, ledger: Ledger, chain: bool, *, isolated: bool = False) -> None:
        self.rt, self.job, self.ledger = rt, job, ledger
        self.isolated = isolated  # tries are counted before each row starts (workers/isolate.py)
        self.outcome = ChunkOutcome(claimed=True)
        self.tokens = 0
        self._seq_of: dict[str, int] = {}
        self._enqueued_at: dict[int, float] = {}
        self._retry: list[DatasetRow] = []
        self._use_cache = not job.options.get("no_cache", False)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tokenmill-next-chunk") if chain else None
        self._next: Future[_Opened | None] | None = None
        self._no_more = not chain
        self._exhausted = 0

    # -- chunks in ---------------------------------------------------------------------------------

    def open(self, chunk: Chunk) -> list[DatasetRow]:
        """The rows of the task's own chunk (already claimed), after serving its cache hits."""
        return self._adopt(self.rt.store.retrying(lambda: self._prepare(chunk)))

    def refill(self, wait: bool) -> list[DatasetRow] | None:
        """Retries first, then the next chunk's rows; None (only when ``wait``) once nothing is left."""
        while True:
            if self._retry:
                rows, self._retry = self._retry, []
                return rows
            if self.ledger.stop_reason is not None:
                return None if wait else []
            if self._next is None and not self._no_more and self._pool is not None:
                self._next = self._pool.submit(self._claim_next)
            if self._next is None:
                return None if wait else []
            if not wait and not self._next.done():
                return []
            opened = self._take_next()
            if opened is not None:
                rows = self._adopt(opened)
                if rows or not wait:
                    return rows

    def _take_next(self) -> _Opened | None:
        assert self._next is not None
        future, self._next = self._next, None
        try:
            opened = future.result()
        except Exception as exc:  # the store blinked: finish what we hold, take no more this task
            log.warning("could not claim the next chunk: %s: %s", type(exc).__name__, mask_text(str(exc)))
            opened = None
        if opened is None:
            self._no_more = True
        return opened

    def _claim_next(self) -> _Opened | None:
        """On the prefetch thread: the job's next chunk, leased to us and loaded, or None when none is left."""
        rt = self.rt
        while self.ledger.stop_reason is None and rt.stopping is None:

            def claim() -> leases.Claim:
                with rt.store.session() as s:
                    return leases.claim_next_for_worker(
                        s, job_id=self.job.id, worker_id=rt.worker_id, lease_seconds=rt.settings.lease_seconds,
                        max_attempts=rt.settings.max_chunk_attempts, max_row_attempts=rt.settings.max_row_attempts,
                    )  # fmt: skip

            got = rt.store.retrying(claim)
            if got.chunk is None:
                return None
            if got.gave_up:
                rt.report_exhausted(got)
                self._exhausted += got.exhausted  # this thread's own count, added to the outcome at close
                continue
            self.ledger.hold(got.chunk.id)
            return rt.store.retrying(functools.partial(self._prepare, got.chunk))
        return None

    def _prepare(self, chunk: Chunk) -> _Opened:
        """Load the chunk's unanswered rows and serve those the result cache answers (either thread)."""
        rt, job = self.rt, self.job
        with rt.store.session() as s:
            done = store_results.done_seqs(s, job.id, chunk.first_seq, chunk.last_seq)
            reqs = store_jobs.load_rows(s, job.id, chunk.first_seq, chunk.last_seq)
        pending = [r for r in reqs if r.seq not in done]
        attempts = {r.seq: r.attempts for r in pending}  # earlier deliveries' failed tries count
        rows: list[tuple[int, DatasetRow]] = []
        cached = 0
        for r in pending:
            row = DatasetRow.from_payload(r.line, r.custom_id, r.payload)
            h = request_hash(rt.model_id, row) if self._use_cache else None
            if h is not None and rt.serve_cached(job, row, r.seq, h):
                cached += 1
            else:
                rows.append((r.seq, row))
        return _Opened(chunk, rows, attempts, cached)

    def _adopt(self, opened: _Opened) -> list[DatasetRow]:
        """Take a prepared chunk's rows into this task (engine thread only); rows already outstanding here
        (the chunk was taken back after its lease lapsed) are not fed twice."""
        chunk = opened.chunk
        self.outcome.chunks += 1
        self.outcome.cached += opened.cached
        self.rt.metrics.cached.inc(opened.cached)
        for seq, tries in opened.attempts.items():
            self.ledger.attempts.setdefault(seq, tries)
        self._enqueued_at[chunk.id] = chunk.enqueued_at or chunk.started_at or time.time()
        fresh = set(self.ledger.adopt(chunk.id, [seq for seq, _ in opened.rows]))
        rows = [(seq, row) for seq, row in opened.rows if seq in fresh]
        for seq, row in rows:
            self._seq_of[row.custom_id] = seq
        if not opened.rows:  # every row answered already (or from the cache): nothing to wait for
            self.rt.writer.close_empty(self.ledger)
        return [row for _, row in rows]

    # -- rows out ----------------------------------------------------------------------------------

    def on_done(self, row: DatasetRow, res: Generation | Exception) -> None:
        rt, job, ledger = self.rt, self.job, self.ledger
        seq = self._seq_of[row.custom_id]
        if isinstance(res, Exception):
            attempt = ledger.attempts[seq] if self.isolated else rt.count_attempt(job.id, seq)
            ledger.attempts[seq] = attempt
            if not isinstance(res, RowRefused) and attempt < rt.settings.max_row_attempts:
                self._retry.append(row)  # goes round again through refill
                return
            self.outcome.failed += 1
            rt.metrics.observe_failure(type(res).__name__)
            rt.write_failure(job, row, seq, res, attempt, ledger)
        else:
            self.outcome.generated += 1
            self.tokens += res.completion_tokens
            rt.metrics.observe(res)
            enqueued = self._enqueued_at[ledger.chunk_of(seq)]
            queue_ms = max(0.0, (time.time() - res.total_ms / 1000.0 - enqueued) * 1000.0)
            attempt = ledger.attempts.get(seq, 0) + 1
            rt.write_success(job, row, seq, res, queue_ms, attempt, request_hash(rt.model_id, row), ledger)

    def seq_of(self, row: DatasetRow) -> int:
        return self._seq_of[row.custom_id]

    def take_retries(self) -> list[DatasetRow]:
        rows, self._retry = self._retry, []
        return rows

    def close(self) -> None:
        """Wait for a claim in flight (its chunk, never fed, stays in the ledger for the task to hand back)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.outcome.failed += self._exhausted

"""A worker process's state: its loaded engine, its identity, its heartbeat, and chunk processing.

One runtime per process, created after the model is loaded and before Celery starts consuming, so a
worker whose model fails to load never takes work. The Celery task gets it explicitly, bound when the
task is registered on the worker's app (:func:`tokenmill.workers.tasks.register`), never from a global.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from tokenmill.cache import copy_cached
from tokenmill.config import Settings, mask_text
from tokenmill.engine import Engine, Generation, SlotUse
from tokenmill.errors import RequestTooLong, RowRefused, RowTimeLimit, StoreFull, WorkerDied
from tokenmill.output import response_body, timings
from tokenmill.rows import DatasetRow
from tokenmill.store import DB_ERRORS, Store, leases
from tokenmill.store import jobs as store_jobs
from tokenmill.store import results as store_results
from tokenmill.store import workers as store_workers
from tokenmill.store.states import ErrorCode, ResultStatus, WorkerState
from tokenmill.store.tables import Chunk, Job
from tokenmill.workers.feed import ChunkFeed, ChunkOutcome
from tokenmill.workers.isolate import run_isolated
from tokenmill.workers.ledger import Ledger
from tokenmill.workers.metrics import WorkerMetrics
from tokenmill.workers.writer import ResultWriter

log = logging.getLogger(__name__)


__all__ = ["ChunkOutcome", "WorkerRuntime"]


class WorkerRuntime:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        engine: Engine,
        worker_id: str,
        model_id: str,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.metrics = metrics or WorkerMetrics()
        self.settings = settings
        self.store = store
        self.engine = engine
        self.worker_id = worker_id
        self.model_id = model_id
        self._current: Ledger | None = None
        self._stopping: str | None = None
        self._consuming = False  # Celery takes messages only a second or more after the model is loaded
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat_loop, name="tokenmill-heartbeat", daemon=True)
        self.writer = ResultWriter(
            store, worker_id, batch_rows=settings.result_batch_rows, batch_ms=settings.result_batch_ms
        )

    def start(self) -> None:
        self._beat.start()

    @property
    def stopping(self) -> str | None:
        """Why the worker is shutting down (its chunks are handed back), or None while it serves."""
        return self._stopping

    def mark_consuming(self) -> None:
        """Celery now takes messages: from here on the worker is ``ready`` (``starting`` until then)."""
        self._consuming = True
        try:
            with self.store.session() as s:
                store_workers.set_state(s, self.worker_id, WorkerState.READY)
        except Exception as exc:  # the next heartbeat says it again
            log.warning("could not mark worker ready: %s", mask_text(str(exc)))

    def close(self) -> None:
        self.writer.close()
        self._closing.set()
        if self._beat.is_alive():
            self._beat.join(timeout=5)

    def stop_current(self, reason: str = "shutdown") -> None:
        """Stop the chunk in progress at the next row boundary and hand its lease back (warm shutdown).

        Called from a signal handler (SIGTERM, or a local worker whose parent died), so it only sets a flag:
        the rows already written stay, the rest of the chunk is reopened at once instead of waiting for the
        lease to run out, and shutdown does not wait for a long chunk to finish.
        """
        self._stopping = reason
        cur = self._current
        if cur is not None and cur.stop_reason is None:
            cur.stop_reason = reason

    def _heartbeat_loop(self) -> None:
        """Keep the worker visible, keep the current lease alive, and notice cancel or a lost lease."""
        interval = min(self.settings.heartbeat_seconds, 1.0)
        last_beat = 0.0
        while not self._closing.wait(interval):
            cur = self._current
            try:
                with self.store.session() as s:
                    held = self._renew(s, cur) if cur is not None else []
                    if time.monotonic() - last_beat >= self.settings.heartbeat_seconds or cur is not None:
                        store_workers.heartbeat(
                            s,
                            self.worker_id,
                            state=self._shown_state(cur),
                            current_job=cur.job_id if cur else None,
                            current_chunk=held[0] if held else None,
                        )
                        last_beat = time.monotonic()
            except DB_ERRORS as exc:
                log.warning("heartbeat failed: %s", mask_text(str(getattr(exc, "orig", exc))).splitlines()[0])
                self.store.engine.dispose()
            except Exception as exc:  # this thread must outlive any error, or our leases expire under us
                log.warning("heartbeat failed: %s: %s", type(exc).__name__, mask_text(str(exc)))
                self.store.engine.dispose()

    def _renew(self, s: Any, cur: Ledger) -> list[int]:
        """Renew every lease the task holds; note a cancel, or a lease lost (taken while we were away)."""
        held = cur.held()
        if store_jobs.is_cancelled(s, cur.job_id):
            cur.stop_reason = "cancelled"
            return held
        for chunk_id in held:
            renewed = leases.renew(s, chunk_id, self.worker_id, self.settings.lease_seconds)
            if not renewed and cur.holds(chunk_id):  # not merely being completed meanwhile
                cur.stop_reason = "lease_lost"
        return held

    def _shown_state(self, cur: Ledger | None) -> WorkerState:
        if cur is not None:
            return WorkerState.BUSY
        return WorkerState.READY if self._consuming else WorkerState.STARTING

    def process_chunk(self, job_id: str, chunk_id: int) -> ChunkOutcome:
        claim = self.store.retrying(lambda: self._claim(chunk_id, job_id))
        chunk, job = claim.chunk, claim.job
        if claim.refused is not None:
            log.warning("message (job %s, chunk %s) dropped, not claimed: %s", job_id, chunk_id, claim.refused)
            return ChunkOutcome(claimed=False)
        if chunk is None or job is None:
            log.info("chunk %s of job %s not claimed (done, cancelled, or leased by another worker)", chunk_id, job_id)
            return ChunkOutcome(claimed=False)
        if claim.gave_up:  # the claim gave up on it and closed it
            self.report_exhausted(claim)
            return ChunkOutcome(claimed=True, failed=claim.exhausted)
        # A shutdown that arrived while we were claiming: hand the chunk straight back.
        cur = Ledger(job_id, chunk_id, stop_reason=self._stopping)
        with self._lock:
            self._current = cur
        try:
            return self._run(job, chunk, cur, isolate=claim.isolate)
        finally:
            with self._lock:
                self._current = None

    def report_exhausted(self, claim: leases.Claim) -> None:
        chunk = claim.chunk
        assert chunk is not None
        log.warning(
            "chunk %s of job %s claimed %d times (limit %d): %d unanswered rows failed with %s",
            chunk.id, chunk.job_id, chunk.attempts, self.settings.max_chunk_attempts, claim.exhausted,
            ErrorCode.CHUNK_ATTEMPTS_EXHAUSTED,
        )  # fmt: skip

    def _claim(self, chunk_id: int, job_id: str) -> leases.Claim:
        with self.store.session() as s:
            return leases.claim_for_worker(
                s,
                job_id=job_id,
                chunk_id=chunk_id,
                worker_id=self.worker_id,
                lease_seconds=self.settings.lease_seconds,
                max_attempts=self.settings.max_chunk_attempts,
                max_row_attempts=self.settings.max_row_attempts,
            )

    def _run(self, job: Job, chunk: Chunk, cur: Ledger, *, isolate: bool = False) -> ChunkOutcome:
        started = time.monotonic()
        feed = ChunkFeed(self, job, cur, chain=self.settings.chain_chunks and not isolate, isolated=isolate)
        before = SlotUse(**vars(self.engine.slot_use))
        try:
            todo = feed.open(chunk)
            self.metrics.processing.set(len(todo))
            if isolate:
                log.warning("chunk %s of job %s was lost with its worker %d times: trying its %d rows one at a time",
                            chunk.id, job.id, chunk.attempts - 1, len(todo))  # fmt: skip
                run_isolated(self, feed, cur, todo, self.settings.max_row_attempts)
            else:
                self.engine.generate(todo, feed.on_done, lambda: cur.stop_reason is not None, refill=feed.refill)
        finally:
            feed.close()
            self.metrics.processing.set(0)
        outcome = feed.outcome
        outcome.stopped = cur.stop_reason
        use = self.engine.slot_use.since(before)
        self.metrics.observe_chunk(time.monotonic() - started, feed.tokens)
        self.metrics.observe_slots(use)
        try:
            self.writer.flush()  # every row generated is committed (its chunk completed with it), or failed
        except StoreFull:
            raise
        except Exception as exc:  # those rows stay outstanding: their chunks are handed back below
            log.warning("results of job %s not stored: %s; their chunks go back for another try", job.id,
                        type(exc).__name__)  # fmt: skip
        held = cur.held()  # not completed: a stop, rows that did not commit, or claimed ahead and never fed
        if held and cur.stop_reason is None:
            log.info("chunks %s of job %s not finished by this task; handed back", held, job.id)

        def finish() -> None:
            with self.store.session() as s:
                for chunk_id in held:
                    leases.release(s, chunk_id, self.worker_id)
                store_jobs.add_slot_use(s, job.id, use.steps, use.slots, use.filled)
                for closed in store_jobs.finish_jobs(s, [job.id]):  # its last chunk: the job ends now
                    log.info("job %s %s", closed, store_jobs.state_of(s, closed))

        self.store.retrying(finish)
        return outcome

    def count_attempt(self, job_id: str, seq: int) -> int:
        """Store a failed try, so a redelivered chunk does not give the row a fresh set of attempts."""

        def count() -> int:
            with self.store.session() as s:
                return store_results.count_attempt(s, job_id, seq)

        return self.store.retrying(count)

    def serve_cached(self, job: Job, row: DatasetRow, seq: int, h: str) -> bool:
        return self.store.retrying(lambda: copy_cached(self.store, job.id, seq, row, h, self.worker_id))

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
    ) -> None:
        values: dict[str, Any] = {
            "job_id": job.id,
            "seq": seq,
            "custom_id": row.custom_id,
            "status": ResultStatus.SUCCEEDED,
            "body": response_body(row, gen, self.engine.variant, f"{job.id}-{seq}"),
            "worker_id": self.worker_id,
            "variant": self.engine.variant,
            "timings": timings(gen, queue_ms=queue_ms, load_ms=self.engine.load_ms),
            "prompt_tokens": gen.prompt_tokens,
            "completion_tokens": gen.completion_tokens,
            "attempts": attempt,
            "request_hash": h,
        }
        self.writer.put(values, gen.completion_tokens, ledger)

    def write_failure(
        self, job: Job, row: DatasetRow, seq: int, exc: Exception, attempt: int, ledger: Ledger | None = None
    ) -> None:
        code = ErrorCode.GENERATION_FAILED
        if isinstance(exc, RequestTooLong):
            code = ErrorCode.CONTEXT_LENGTH_EXCEEDED
        elif isinstance(exc, RowTimeLimit):
            code = ErrorCode.ROW_TIME_LIMIT_EXCEEDED
        elif isinstance(exc, WorkerDied):
            code = ErrorCode.WORKER_DIED
        elif isinstance(exc, RowRefused):
            code = ErrorCode.INVALID_REQUEST
        message = mask_text(str(exc)) or type(exc).__name__
        values: dict[str, Any] = {
            "job_id": job.id,
            "seq": seq,
            "custom_id": row.custom_id,
            "status": ResultStatus.FAILED,
            "error_code": code,
            "error": f"line {row.line}: {message}",
            "worker_id": self.worker_id,
            "variant": self.engine.variant,
            "attempts": attempt,
        }
        self.writer.put(values, 0, ledger)

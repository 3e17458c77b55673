"""A worker process's state: its loaded engine, its identity, its heartbeat, and chunk processing.

One runtime per process, created after the model is loaded and before Celery starts consuming, so a
worker whose model fails to load never takes work. The Celery task gets it explicitly, bound when the
task is registered on the worker's app (:func:`tokenmill.workers.tasks.register`), never from a global.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tokenmill.cache import copy_cached, request_hash
from tokenmill.config import Settings, mask_text
from tokenmill.engine import Engine, Generation
from tokenmill.errors import RequestTooLong, RowRefused
from tokenmill.output import response_body, timings
from tokenmill.rows import DatasetRow
from tokenmill.store import DB_ERRORS, Store, leases
from tokenmill.store import jobs as store_jobs
from tokenmill.store import results as store_results
from tokenmill.store import workers as store_workers
from tokenmill.store.states import ErrorCode, ResultStatus, WorkerState
from tokenmill.store.tables import Chunk, Job
from tokenmill.workers.metrics import WorkerMetrics
from tokenmill.workers.writer import ResultWriter

log = logging.getLogger(__name__)


@dataclass
class ChunkOutcome:
    claimed: bool
    generated: int = 0
    cached: int = 0
    failed: int = 0
    stopped: str | None = None  # "cancelled" | "lease_lost" | "shutdown"


@dataclass
class _Current:
    job_id: str
    chunk_id: int
    stop_reason: str | None = None
    attempts: dict[int, int] = field(default_factory=dict)


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
        self._current: _Current | None = None
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
                    if cur is not None:
                        if store_jobs.is_cancelled(s, cur.job_id):
                            cur.stop_reason = "cancelled"
                        elif not leases.renew(s, cur.chunk_id, self.worker_id, self.settings.lease_seconds):
                            cur.stop_reason = "lease_lost"
                    if time.monotonic() - last_beat >= self.settings.heartbeat_seconds or cur is not None:
                        store_workers.heartbeat(
                            s,
                            self.worker_id,
                            state=self._shown_state(cur),
                            current_job=cur.job_id if cur else None,
                            current_chunk=cur.chunk_id if cur else None,
                        )
                        last_beat = time.monotonic()
            except DB_ERRORS as exc:
                log.warning("heartbeat failed: %s", mask_text(str(getattr(exc, "orig", exc))).splitlines()[0])
                self.store.engine.dispose()
            except Exception as exc:  # this thread must outlive any error, or our leases expire under us
                log.warning("heartbeat failed: %s: %s", type(exc).__name__, mask_text(str(exc)))
                self.store.engine.dispose()

    def _shown_state(self, cur: _Current | None) -> WorkerState:
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
        if chunk.attempts > self.settings.max_chunk_attempts:  # the claim gave up on it and closed it
            log.warning(
                "chunk %s of job %s claimed %d times (limit %d): %d unanswered rows failed with %s",
                chunk_id, job_id, chunk.attempts, self.settings.max_chunk_attempts, claim.exhausted,
                ErrorCode.CHUNK_ATTEMPTS_EXHAUSTED,
            )  # fmt: skip
            return ChunkOutcome(claimed=True, failed=claim.exhausted)
        # A shutdown that arrived while we were claiming: hand the chunk straight back.
        cur = _Current(job_id=job_id, chunk_id=chunk_id, stop_reason=self._stopping)
        with self._lock:
            self._current = cur
        try:
            return self._run(job, chunk, cur)
        finally:
            with self._lock:
                self._current = None

    def _claim(self, chunk_id: int, job_id: str) -> leases.Claim:
        with self.store.session() as s:
            return leases.claim_for_worker(
                s,
                job_id=job_id,
                chunk_id=chunk_id,
                worker_id=self.worker_id,
                lease_seconds=self.settings.lease_seconds,
                max_attempts=self.settings.max_chunk_attempts,
            )

    def _run(self, job: Job, chunk: Chunk, cur: _Current) -> ChunkOutcome:
        started = time.monotonic()
        tokens = 0
        outcome = ChunkOutcome(claimed=True)
        enqueued_at = chunk.enqueued_at or chunk.started_at or time.time()

        def load() -> list[tuple[int, DatasetRow]]:
            with self.store.session() as s:
                done = store_results.done_seqs(s, job.id, chunk.first_seq, chunk.last_seq)
                reqs = store_jobs.load_rows(s, job.id, chunk.first_seq, chunk.last_seq)
            pending = [r for r in reqs if r.seq not in done]
            cur.attempts.update((r.seq, r.attempts) for r in pending)  # earlier deliveries' failed tries count
            return [(r.seq, DatasetRow.from_payload(r.line, r.custom_id, r.payload)) for r in pending]

        pending = self.store.retrying(load)
        seq_of = {row.custom_id: seq for seq, row in pending}
        rows = [row for _, row in pending]
        use_cache = not job.options.get("no_cache", False)
        todo: list[DatasetRow] = []
        for row in rows:
            h = request_hash(self.model_id, row) if use_cache else None
            if h is not None and self._serve_cached(job, row, seq_of[row.custom_id], h):
                outcome.cached += 1
            else:
                todo.append(row)

        retry: list[DatasetRow] = []

        def should_stop() -> bool:
            return cur.stop_reason is not None

        def on_done(row: DatasetRow, res: Generation | Exception) -> None:
            nonlocal tokens
            seq = seq_of[row.custom_id]
            if isinstance(res, Exception):
                attempt = cur.attempts[seq] = self._count_attempt(job.id, seq)
                retryable = not isinstance(res, RowRefused)
                if retryable and attempt < self.settings.max_row_attempts:
                    retry.append(row)
                    return
                outcome.failed += 1
                self.metrics.observe_failure(type(res).__name__)
                self._write_failure(job, row, seq, res, attempt)
                return
            outcome.generated += 1
            tokens += res.completion_tokens
            self.metrics.observe(res)
            queue_ms = max(0.0, (time.time() - res.total_ms / 1000.0 - enqueued_at) * 1000.0)
            attempt = cur.attempts.get(seq, 0) + 1
            self._write_success(job, row, seq, res, queue_ms, attempt, request_hash(self.model_id, row))

        self.metrics.processing.set(len(todo))
        while todo and not should_stop():
            self.engine.generate(todo, on_done, should_stop)
            todo = list(retry)  # rows that failed but have attempts left go round again
            retry.clear()
        self.metrics.processing.set(0)
        self.metrics.observe_chunk(time.monotonic() - started, tokens)
        self.metrics.cached.inc(outcome.cached)

        outcome.stopped = cur.stop_reason
        self.writer.flush()  # the chunk is done only once its rows are in the store

        def finish() -> None:
            with self.store.session() as s:
                if cur.stop_reason is None:
                    leases.complete(s, chunk.id, self.worker_id)
                elif cur.stop_reason in ("cancelled", "shutdown"):
                    leases.release(s, chunk.id, self.worker_id)

        self.store.retrying(finish)
        return outcome

    def _count_attempt(self, job_id: str, seq: int) -> int:
        """Store a failed try, so a redelivered chunk does not give the row a fresh set of attempts."""

        def count() -> int:
            with self.store.session() as s:
                return store_results.count_attempt(s, job_id, seq)

        return self.store.retrying(count)

    def _serve_cached(self, job: Job, row: DatasetRow, seq: int, h: str) -> bool:
        return self.store.retrying(lambda: copy_cached(self.store, job.id, seq, row, h, self.worker_id))

    def _write_success(
        self, job: Job, row: DatasetRow, seq: int, gen: Generation, queue_ms: float, attempt: int, h: str | None
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
        self.writer.put(values, gen.completion_tokens)

    def _write_failure(self, job: Job, row: DatasetRow, seq: int, exc: Exception, attempt: int) -> None:
        code = ErrorCode.CONTEXT_LENGTH_EXCEEDED if isinstance(exc, RequestTooLong) else ErrorCode.GENERATION_FAILED
        if isinstance(exc, RowRefused) and not isinstance(exc, RequestTooLong):
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
        self.writer.put(values, 0)

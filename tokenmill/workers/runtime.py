"""A worker process's state: its loaded engine, its identity, its heartbeat, and chunk processing.

One runtime per process, created after the model is loaded and before Celery starts consuming, so a
worker whose model fails to load never takes work.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import DBAPIError, OperationalError

from tokenmill.cache import copy_cached, request_hash
from tokenmill.config import Settings, mask_text
from tokenmill.engine import Engine, Generation
from tokenmill.errors import RequestTooLong, RowRefused
from tokenmill.output import response_body, timings
from tokenmill.rows import DatasetRow
from tokenmill.store import Store, leases
from tokenmill.store import jobs as store_jobs
from tokenmill.store import results as store_results
from tokenmill.store import workers as store_workers
from tokenmill.store.tables import Chunk, Job
from tokenmill.workers.metrics import WorkerMetrics

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

    def start(self) -> None:
        self._beat.start()

    def mark_consuming(self) -> None:
        """Celery now takes messages: from here on the worker is ``ready`` (``starting`` until then)."""
        self._consuming = True
        try:
            with self.store.session() as s:
                store_workers.set_state(s, self.worker_id, "ready")
        except Exception as exc:  # the next heartbeat says it again
            log.warning("could not mark worker ready: %s", mask_text(str(exc)))

    def close(self) -> None:
        self._closing.set()
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
                        job = s.get(Job, cur.job_id)
                        if job is None or job.state == "cancelled":
                            cur.stop_reason = "cancelled"
                        elif not leases.renew(s, cur.chunk_id, self.worker_id, self.settings.lease_seconds):
                            cur.stop_reason = "lease_lost"
                    if time.monotonic() - last_beat >= self.settings.heartbeat_seconds or cur is not None:
                        store_workers.heartbeat(
                            s,
                            self.worker_id,
                            state="busy" if cur else "ready" if self._consuming else "starting",
                            current_job=cur.job_id if cur else None,
                            current_chunk=cur.chunk_id if cur else None,
                        )
                        last_beat = time.monotonic()
            except (OperationalError, DBAPIError) as exc:
                log.warning("heartbeat failed: %s", mask_text(str(exc.orig)).splitlines()[0])
                self.store.engine.dispose()
            except Exception as exc:  # this thread must outlive any error, or our leases expire under us
                log.warning("heartbeat failed: %s: %s", type(exc).__name__, mask_text(str(exc)))
                self.store.engine.dispose()

    def process_chunk(self, job_id: str, chunk_id: int) -> ChunkOutcome:
        chunk, job = self.store.retrying(lambda: self._claim(chunk_id, job_id))
        if chunk is None or job is None:
            log.info("chunk %s of job %s not claimed (done, cancelled, or leased by another worker)", chunk_id, job_id)
            return ChunkOutcome(claimed=False)
        # A shutdown that arrived while we were claiming: hand the chunk straight back.
        cur = _Current(job_id=job_id, chunk_id=chunk_id, stop_reason=self._stopping)
        with self._lock:
            self._current = cur
        try:
            return self._run(job, chunk, cur)
        finally:
            with self._lock:
                self._current = None

    def _claim(self, chunk_id: int, job_id: str) -> tuple[Chunk | None, Job | None]:
        with self.store.session() as s:
            chunk = leases.claim(s, chunk_id, self.worker_id, self.settings.lease_seconds)
            if chunk is None:
                return None, None
            job = s.get(Job, job_id)
            if job is not None and job.state == "queued":
                job.state = "running"
                job.started_at = job.started_at or time.time()
            return chunk, job

    def _run(self, job: Job, chunk: Chunk, cur: _Current) -> ChunkOutcome:
        started = time.monotonic()
        tokens = 0
        outcome = ChunkOutcome(claimed=True)
        enqueued_at = chunk.enqueued_at or chunk.started_at or time.time()

        def load() -> list[tuple[int, DatasetRow]]:
            with self.store.session() as s:
                done = store_results.done_seqs(s, job.id, chunk.first_seq, chunk.last_seq)
                reqs = store_jobs.load_rows(s, job.id, chunk.first_seq, chunk.last_seq)
            return [(r.seq, DatasetRow.from_payload(r.line, r.custom_id, r.payload)) for r in reqs if r.seq not in done]

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
            attempt = cur.attempts.get(seq, 0) + 1
            cur.attempts[seq] = attempt
            if isinstance(res, Exception):
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

        def finish() -> None:
            with self.store.session() as s:
                if cur.stop_reason is None:
                    leases.complete(s, chunk.id, self.worker_id)
                elif cur.stop_reason in ("cancelled", "shutdown"):
                    leases.release(s, chunk.id, self.worker_id)

        self.store.retrying(finish)
        return outcome

    def _serve_cached(self, job: Job, row: DatasetRow, seq: int, h: str) -> bool:
        return self.store.retrying(lambda: copy_cached(self.store, job.id, seq, row, h, self.worker_id))

    def _write_success(
        self, job: Job, row: DatasetRow, seq: int, gen: Generation, queue_ms: float, attempt: int, h: str | None
    ) -> None:
        values: dict[str, Any] = {
            "job_id": job.id,
            "seq": seq,
            "custom_id": row.custom_id,
            "status": "succeeded",
            "body": response_body(row, gen, self.engine.variant, f"{job.id}-{seq}"),
            "worker_id": self.worker_id,
            "variant": self.engine.variant,
            "timings": timings(gen, queue_ms=queue_ms, load_ms=self.engine.load_ms),
            "prompt_tokens": gen.prompt_tokens,
            "completion_tokens": gen.completion_tokens,
            "attempts": attempt,
            "request_hash": h,
        }

        def write() -> None:
            with self.store.session() as s:
                if store_results.write_result(s, values):
                    store_workers.count_tokens(s, self.worker_id, 1, gen.completion_tokens)

        self.store.retrying(write)

    def _write_failure(self, job: Job, row: DatasetRow, seq: int, exc: Exception, attempt: int) -> None:
        code = "context_length_exceeded" if isinstance(exc, RequestTooLong) else "generation_failed"
        if isinstance(exc, RowRefused) and not isinstance(exc, RequestTooLong):
            code = "invalid_request"
        message = mask_text(str(exc)) or type(exc).__name__
        values: dict[str, Any] = {
            "job_id": job.id,
            "seq": seq,
            "custom_id": row.custom_id,
            "status": "failed",
            "error_code": code,
            "error": f"line {row.line}: {message}",
            "worker_id": self.worker_id,
            "variant": self.engine.variant,
            "attempts": attempt,
        }

        def write() -> None:
            with self.store.session() as s:
                if store_results.write_result(s, values):
                    store_workers.count_tokens(s, self.worker_id, 1, 0)

        self.store.retrying(write)


_runtime: WorkerRuntime | None = None


def install(runtime: WorkerRuntime) -> None:
    global _runtime
    _runtime = runtime


def current() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError("no tokenmill worker runtime in this process (start it with `tokenmill worker`)")
    return _runtime

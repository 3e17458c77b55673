"""The batch driver: moves every open batch along its lifecycle, in whichever API process gets there first.

Each step takes the batch's lease in the store, so any number of `serve` replicas can run a driver and
each step still happens once; a process killed mid-step leaves a lease that runs out, and the step is
done again (an ingest resumes where it stopped, finalizing is one transaction). Every status change is a
conditional UPDATE in store/batches.py, so a step that lost a race to a cancel changes nothing.

One thread drives every tenant's batches, so no batch may hold it: a file that cannot be validated fails
its batch on the first try, whatever the reason; a step that keeps failing (the store, a bug) is retried
with a growing delay; and a pass does at most ``HEAVY_STEPS_PER_TICK`` validations or finalizations,
taking tenants in turn, before the cheap checks of the next pass.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tokenmill.config import Settings, mask_text
from tokenmill.errors import ServiceUnavailable, StoreFull, TokenmillError
from tokenmill.output import failed_line, output_line
from tokenmill.server import validation
from tokenmill.server.ingest import SLICE_ROWS, Ingest, parse
from tokenmill.store import Store
from tokenmill.store import batches as store_batches
from tokenmill.store import files as store_files
from tokenmill.store import jobs as store_jobs
from tokenmill.store.clock import db_now
from tokenmill.store.db import TRANSIENT_ERRORS, Session, log_reason
from tokenmill.store.results import iter_results
from tokenmill.store.states import BatchStatus
from tokenmill.store.tables import ApiBatch, Job

log = logging.getLogger(__name__)
LEASE_SECONDS = 120.0
HEAVY_STEPS_PER_TICK = 2
MAX_RETRY_DELAY = 60.0
SWEEP_EVERY = 60.0
ABANDONED_UPLOAD_SECONDS = 3600.0
# Worth another try later: the store blinked or is full. Anything else in validation fails the batch.
RETRY_LATER: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, ServiceUnavailable, StoreFull)


class _Lost(Exception):
    """Raised inside a transaction to roll it back: the batch moved on, or another driver took it over."""


def _error(message: str, code: str = "validation_failed") -> list[dict[str, Any]]:
    return [{"code": code, "line": None, "message": message, "param": None}]


class BatchDriver:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.holder = f"serve:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._retry_at: dict[str, float] = {}  # batch -> monotonic time of its next try, after a failed step
        self._failures: dict[str, int] = {}
        self._served: dict[str, float] = {}  # owner -> when a heavy step last ran for it
        self._swept = 0.0
        self.slice_rows = SLICE_ROWS

    def run(self, stop: threading.Event, interval: float = 0.5) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # the store blinked; the next pass tries again
                log.warning("batch driver: %s", log_reason(exc))
            stop.wait(interval)

    def tick(self) -> None:
        with self.store.session() as s:
            batches = store_batches.open_batches(s)
        heavy = 0
        for batch_id, owner in self._fair(batches):
            if self._retry_at.get(batch_id, 0.0) > time.monotonic():
                continue
            try:
                did = self.step(batch_id, heavy_ok=heavy < HEAVY_STEPS_PER_TICK)
            except Exception as exc:
                self._back_off(batch_id, exc)
                continue
            self._failures.pop(batch_id, None)
            self._retry_at.pop(batch_id, None)
            if did:
                heavy += 1
                self._served[owner] = time.monotonic()
        open_ids = {batch_id for batch_id, _ in batches}
        for gone in set(self._retry_at) - open_ids:
            self._retry_at.pop(gone, None)
            self._failures.pop(gone, None)
        self._sweep()

    def _fair(self, batches: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """Every tenant's first open batch before anyone's second, the tenant served longest ago first."""
        rank: dict[str, int] = {}
        keyed = []
        for i, (batch_id, owner) in enumerate(batches):  # oldest first
            rank[owner] = rank.get(owner, -1) + 1
            keyed.append((rank[owner], self._served.get(owner, 0.0), i, batch_id, owner))
        return [(batch_id, owner) for *_, batch_id, owner in sorted(keyed)]

    def _back_off(self, batch_id: str, exc: Exception) -> None:
        n = self._failures.get(batch_id, 0) + 1
        self._failures[batch_id] = n
        delay = min(MAX_RETRY_DELAY, 0.5 * 2**n)
        self._retry_at[batch_id] = time.monotonic() + delay
        log.warning("batch %s: step failed (%s); next try in %.0fs", batch_id, log_reason(exc), delay)

    def _sweep(self) -> None:
        now = time.monotonic()
        if now - self._swept < SWEEP_EVERY:
            return
        self._swept = now
        with self.store.session() as s:
            store_files.sweep_abandoned(s, time.time() - ABANDONED_UPLOAD_SECONDS)

    def step(self, batch_id: str, heavy_ok: bool = True) -> bool:
        """One move of one batch; True when it did heavy work (validated, or wrote the output files)."""
        with self.store.session() as s:
            b = s.get(ApiBatch, batch_id)
            if b is None or b.status in store_batches.FINAL:
                return False
            status = BatchStatus(b.status)
            job_state = store_jobs.state_of(s, b.job_id) if b.job_id else None
            now = db_now(s)  # the store's clock, as when the window was set
            final = store_batches.final_status(b, job_state, now)
            expired = now >= b.expires_at
        if status == BatchStatus.VALIDATING:
            if expired:
                self.expire_validating(batch_id)
                return False
            return heavy_ok and self.validate(batch_id)
        if status == BatchStatus.IN_PROGRESS and final is None:
            return False
        return heavy_ok and self.finalize(batch_id)

    # validation -------------------------------------------------------------------------------------

    def validate(self, batch_id: str) -> bool:
        """Parse, then ingest in short transactions (server/ingest.py). Anything but a store outage fails
        the batch now, with a message: a file that broke the parser once breaks it every time."""
        with self.store.session() as s:
            b = store_batches.claim(s, batch_id, self.holder, LEASE_SECONDS, (BatchStatus.VALIDATING,))
            if b is None:
                return False
            file_id, endpoint = b.input_file_id, b.endpoint
        try:
            with validation.scratch() as folder:
                parsed = parse(self.store, file_id, endpoint, Path(folder), self.settings)
                checked = parsed.checked
                if checked.errors:
                    self._fail(batch_id, checked.sorted_errors(), checked.lines)
                    log.info("batch %s failed validation: %d bad lines", batch_id, len(checked.errors))
                else:
                    Ingest(
                        self.store, self.holder, LEASE_SECONDS, self.slice_rows, engine=self.settings.engine
                    ).run(batch_id, parsed)
        except RETRY_LATER:
            raise
        except TokenmillError as exc:  # the input file is gone or damaged: its message says which
            self._fail(batch_id, _error(mask_text(str(exc)).splitlines()[0], "invalid_file"), 0)
        except Exception as exc:
            log.warning("batch %s: validation failed: %s", batch_id, log_reason(exc))
            message = f"the file could not be validated ({type(exc).__name__}); nothing was run"
            self._fail(batch_id, _error(message), 0)
        return True

    def _fail(self, batch_id: str, errors: list[dict[str, Any]], lines: int) -> None:
        """validating → failed; a job an interrupted ingest left is cancelled with it."""
        with self.store.session() as s:
            b = s.get(ApiBatch, batch_id, populate_existing=True)
            if b is not None and store_batches.fail(s, batch_id, self.holder, errors, lines) and b.job_id:
                self._cancel_job(s, b.job_id)

    def expire_validating(self, batch_id: str) -> None:
        with self.store.session() as s:
            moved, job_id = store_batches.expire_validating(s, batch_id)
            if job_id:
                self._cancel_job(s, job_id)
        if moved:
            log.info("batch %s expired before it was validated", batch_id)

    @staticmethod
    def _cancel_job(s: Session, job_id: str) -> None:
        job = s.get(Job, job_id)
        if job is not None:
            store_jobs.cancel_job(s, job)

    # finalizing -------------------------------------------------------------------------------------

    def finalize(self, batch_id: str) -> bool:
        """in_progress | cancelling → finalizing → the end state with its files; True when the files were
        written. The end state is decided again on every pass (store/batches.py ``final_status``), so a
        finalizer that died is redone the same way; a cancelled or expired batch's job is stopped first, and
        the files wait for rows a worker is still finishing, unless the batch is past its window."""
        with self.store.session() as s:
            b = store_batches.claim(s, batch_id, self.holder, LEASE_SECONDS, store_batches.FINISHING)
            if b is None or b.job_id is None:
                return False
            job_id, now = b.job_id, db_now(s)
            final = store_batches.final_status(b, store_jobs.state_of(s, job_id), now)
            if final is None:
                store_batches.release(s, batch_id, self.holder)
                return False
            if final in (BatchStatus.EXPIRED, BatchStatus.CANCELLED):
                self._cancel_job(s, job_id)
            if not store_batches.begin_finalizing(s, batch_id, self.holder, final):
                return False
            past_window = now >= b.expires_at
        if not past_window:
            with self.store.session() as s:
                if store_batches.live_chunks(s, job_id):
                    return False  # a worker is finishing its current row; next pass
        try:
            with self.store.session() as s:
                b = self._renew(s, batch_id)
                final = store_batches.final_status(b, store_jobs.state_of(s, job_id), db_now(s))
                assert final is not None  # finalizing: cancelled, job finished, or past the window
                owner, keep = b.owner, b.output_expires_after  # expiry: None keeps the files
            self._write_files(batch_id, owner, job_id, final, keep)
        except _Lost:
            return False
        log.info("batch %s %s", batch_id, final.value)
        return True

    def _renew(self, s: Session, batch_id: str) -> ApiBatch:
        b = store_batches.claim(s, batch_id, self.holder, LEASE_SECONDS, (BatchStatus.FINALIZING,))
        if b is None:
            raise _Lost
        return b

    def _write_files(
        self, batch_id: str, owner: str, job_id: str, final: BatchStatus, expires_after: float | None
    ) -> None:
        """Output and error files from the store into the store, one chunk per short transaction (each
        renewing the lease), then the end state and the files shown together in one last short one; files
        of a finalizer that lost the batch meanwhile are deleted, so a batch gets them at most once."""
        files = [
            store_files.FileWriter(self.store, owner=owner, filename=f"{batch_id}_{kind}.jsonl",
                                   purpose="batch_output", before_flush=lambda s: self._renew(s, batch_id),
                                   expires_after=expires_after)
            for kind in ("output", "error")
        ]  # fmt: skip
        try:
            counts = self._fill(files[0], files[1], job_id, final)
            written = [f.close() for f in files]
            with self.store.session() as s:
                self._renew(s, batch_id)
                ids = [f.id if f.lines and store_files.publish(s, f) else None for f in written]
                if not store_batches.finish(s, batch_id, self.holder, final, output_file_id=ids[0],
                                            error_file_id=ids[1], **counts):  # fmt: skip
                    raise _Lost
            for f, file_id in zip(files, ids, strict=True):
                if file_id is None:
                    f.discard()
        except BaseException:
            for f in files:
                f.discard()
            raise

    def _fill(
        self, out: store_files.FileWriter, err: store_files.FileWriter, job_id: str, final: BatchStatus
    ) -> dict[str, Any]:
        """The lines, read page by page in a session that writes nothing; the batch's counts and usage."""
        ok = bad = prompt = completion = 0
        with self.store.session() as reader:
            for result, request in iter_results(reader, job_id):
                if result.status == "succeeded":
                    ok += 1
                    prompt += result.prompt_tokens
                    completion += result.completion_tokens
                    out.write_line(json.dumps(output_line(result, request), ensure_ascii=False))
                else:
                    bad += 1
                    err.write_line(json.dumps(failed_line(result, request), ensure_ascii=False))
            if final in (BatchStatus.EXPIRED, BatchStatus.CANCELLED):
                code = "batch_expired" if final == BatchStatus.EXPIRED else "batch_cancelled"
                for request in store_batches.unfinished_requests(reader, job_id):
                    bad += 1
                    err.write_line(json.dumps(_unfinished_line(job_id, request.seq, request.custom_id,
                                                               request.line, code)))  # fmt: skip
        usage = {
            "input_tokens": prompt,
            "output_tokens": completion,
            "total_tokens": prompt + completion,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }
        return {"completed": ok, "failed": bad, "usage": usage}


def _unfinished_line(job_id: str, seq: int, custom_id: str, line: int, code: str) -> dict[str, object]:
    why = "the batch's completion window ran out" if code == "batch_expired" else "the batch was cancelled"
    return {
        "id": f"batch_req_{job_id}_{seq}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": f"not run: {why} first", "line": line},
    }

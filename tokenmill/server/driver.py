"""The batch driver: moves every open batch along its lifecycle, in whichever API process gets there first.

Each step takes the batch's lease in the store, so any number of `serve` replicas can run a driver and
each step still happens once; a process killed mid-step leaves a lease that runs out, and the step is
done again from the start (validation and finalizing are each one transaction, so never half done).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from pathlib import Path

from tokenmill.celery_app import queue_for
from tokenmill.config import Settings, mask_text
from tokenmill.output import failed_line, output_line
from tokenmill.server import validation
from tokenmill.store import Store
from tokenmill.store import batches as store_batches
from tokenmill.store import files as store_files
from tokenmill.store import jobs as store_jobs
from tokenmill.store.batches import BatchStatus
from tokenmill.store.clock import db_now
from tokenmill.store.db import Session
from tokenmill.store.results import iter_results
from tokenmill.store.tables import ApiBatch, Job

log = logging.getLogger(__name__)
LEASE_SECONDS = 120.0


class _Invalid(Exception):
    """Raised inside the ingest transaction to roll it back when any line was bad."""


class BatchDriver:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.holder = f"serve:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"

    def run(self, stop: threading.Event, interval: float = 0.5) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except Exception as exc:  # the store blinked; the next pass tries again
                log.warning("batch driver: %s", (mask_text(str(exc)).splitlines() or [type(exc).__name__])[0])
            stop.wait(interval)

    def tick(self) -> None:
        with self.store.session() as s:
            ids = store_batches.open_batch_ids(s)
        for batch_id in ids:
            try:
                self.step(batch_id)
            except Exception:
                log.exception("batch %s: step failed; will retry", batch_id)

    def step(self, batch_id: str) -> None:
        with self.store.session() as s:
            b = s.get(ApiBatch, batch_id)
            if b is None:
                return
            status, cancelled = b.status, b.cancelling_at is not None
            job = s.get(Job, b.job_id) if b.job_id else None
            job_state = job.state if job is not None else None
            expired = db_now(s) >= b.expires_at  # the store's clock, as when the window was set
        ran_out = expired and job_state not in ("completed", "completed_with_errors")
        if status == BatchStatus.VALIDATING.value:
            self.validate(batch_id)
        elif status == BatchStatus.IN_PROGRESS.value:
            if job_state in store_jobs.FINAL_STATES:
                final = BatchStatus.CANCELLED if job_state == "cancelled" else BatchStatus.COMPLETED
                self.finalize(batch_id, final)
            elif expired:
                self.finalize(batch_id, BatchStatus.EXPIRED)
        elif status == BatchStatus.CANCELLING.value:
            self.finalize(batch_id, BatchStatus.CANCELLED)
        elif status == BatchStatus.FINALIZING.value:  # a finalizer died, or waits for a row: again
            final = BatchStatus.CANCELLED if cancelled else BatchStatus.EXPIRED if ran_out else BatchStatus.COMPLETED
            self.finalize(batch_id, final)

    # validation -------------------------------------------------------------------------------------

    def validate(self, batch_id: str) -> None:
        with self.store.session() as s:
            b = store_batches.claim(s, batch_id, self.holder, LEASE_SECONDS, (BatchStatus.VALIDATING,))
            if b is None:
                return
            file_id, endpoint = b.input_file_id, b.endpoint
        with validation.scratch() as folder:
            path = validation.spool(self.store, file_id, Path(folder))
            checked = validation.check_lines(path, endpoint)
            if not checked.errors and checked.model is not None:
                try:
                    self._ingest(batch_id, path, checked)
                    return
                except _Invalid:
                    pass
            else:
                for _ in validation.Rows(path, checked):  # collect the reader's errors too; store nothing
                    pass
        if not checked.errors:
            checked.add(0, "no request lines", None, "empty_file")
        with self.store.session() as s:
            b = store_batches.claim(s, batch_id, self.holder, LEASE_SECONDS, (BatchStatus.VALIDATING,))
            if b is not None:
                store_batches.fail(b, checked.sorted_errors(), checked.lines)
                store_batches.release(b)
                log.info("batch %s failed validation: %d bad lines", batch_id, len(checked.errors))

    def _ingest(self, batch_id: str, path: Path, checked: validation.Checked) -> None:
        """Validation and storage in one transaction: a bad line anywhere rolls every row back."""
        model = checked.model
        assert model is not None
        family, quant = validation._catalog_model(model)
        with self.store.session() as s:
            b = store_batches.claim(s, batch_id, self.holder, LEASE_SECONDS, (BatchStatus.VALIDATING,))
            if b is None:  # cancelled meanwhile
                return
            job = store_jobs.create_job(
                s,
                key=validation.job_key(batch_id),
                name=f"{batch_id} ({b.input_file_id})",
                family=family,
                queue=queue_for(family, quant),
                chunk_size=validation.chunk_size(path),
                pinned_variant=f"{family}:{quant}" if quant else None,
                options={"model": model, "batch_id": batch_id, "no_cache": False},
            )
            rows = validation.Rows(path, checked)
            total = store_jobs.ingest_rows(s, job, rows)
            if checked.errors or not total:
                raise _Invalid
            store_batches.start(b, job.id, model, total)
            store_batches.release(b)
        log.info("batch %s: job %s with %d rows on %s", batch_id, job.id, total, model)

    # finalizing -------------------------------------------------------------------------------------

    def finalize(self, batch_id: str, final: BatchStatus) -> None:
        with self.store.session() as s:
            b = store_batches.claim(s, batch_id, self.holder, LEASE_SECONDS)
            if b is None or b.job_id is None:
                return
            job = s.get(Job, b.job_id)
            if job is not None and final in (BatchStatus.EXPIRED, BatchStatus.CANCELLED):
                store_jobs.cancel_job(s, job)
            store_batches.begin_finalizing(b)
        with self.store.session() as s:
            if b.job_id and store_batches.live_chunks(s, b.job_id):
                return  # a worker is finishing its current row; next pass
        with self.store.session() as s:
            b2 = store_batches.claim(s, batch_id, self.holder, LEASE_SECONDS, (BatchStatus.FINALIZING,))
            if b2 is None or b2.job_id is None:
                return
            self._write_files(s, b2, final)
        log.info("batch %s %s", batch_id, final.value)

    def _write_files(self, s: Session, b: ApiBatch, final: BatchStatus) -> None:
        """Output and error files from the store, streamed into the store, with the end state: one commit."""
        assert b.job_id is not None
        out = store_files.FileWriter(s, owner=b.owner, filename=f"{b.id}_output.jsonl", purpose="batch_output")
        err = store_files.FileWriter(s, owner=b.owner, filename=f"{b.id}_error.jsonl", purpose="batch_output")
        ok = bad = prompt = completion = 0
        for result, request in iter_results(s, b.job_id):
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
            for request in store_batches.unfinished_requests(s, b.job_id):
                bad += 1
                err.write_line(json.dumps(_unfinished_line(b, request.seq, request.custom_id, request.line, code)))
        files = [out.close(), err.close()]
        ids: list[str | None] = []
        for f in files:
            if f.lines:
                ids.append(f.id)
            else:
                store_files.delete_file(s, f.id)
                ids.append(None)
        usage = {
            "input_tokens": prompt,
            "output_tokens": completion,
            "total_tokens": prompt + completion,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }
        store_batches.finish(
            b, final, output_file_id=ids[0], error_file_id=ids[1], completed=ok, failed=bad, usage=usage
        )


def _unfinished_line(b: ApiBatch, seq: int, custom_id: str, line: int, code: str) -> dict[str, object]:
    why = "the batch's completion window ran out" if code == "batch_expired" else "the batch was cancelled"
    return {
        "id": f"batch_req_{b.job_id}_{seq}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": f"not run: {why} first", "line": line},
    }

"""A batch's validation and ingest, with no long transaction: parse first, then store in short slices.

Parsing (both passes of server/validation.py) reads the spooled input file and writes every valid row,
as it will be stored, to a second local file; no transaction is open meanwhile. Only a file with no bad
line goes on: one transaction creates the job (``ingesting``) and records it on the batch, a transaction
per slice stores rows (each renewing the batch's lease and checking it is still ``validating``, so a
cancel stops the ingest at the next slice), and a last one makes the batch ``in_progress`` and the job
``queued``. A driver that dies mid-ingest leaves a batch still ``validating`` with its job attached; the
next one to take the lease parses again and stores the rows from where the dead one stopped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenmill.celery_app import queue_for
from tokenmill.config import DEFAULT_ENGINE, Settings
from tokenmill.server import validation
from tokenmill.store import Store
from tokenmill.store import batches as store_batches
from tokenmill.store import ingest as store_ingest
from tokenmill.store import jobs as store_jobs
from tokenmill.store.states import BatchStatus, JobState
from tokenmill.store.tables import Job

log = logging.getLogger(__name__)
SLICE_ROWS = 500
SLICE_BYTES = 2**20  # a slice's rows, as staged JSON: what one short write transaction stores


@dataclass
class Parsed:
    """What parsing learned: the errors (nothing is stored when there are any), the rows staged to store."""

    checked: validation.Checked
    staged: Path
    total: int
    chunk_size: int


def parse(store: Store, file_id: str, endpoint: str, folder: Path, settings: Settings | None = None) -> Parsed:
    """Both validation passes over the stored file, outside any transaction; valid rows staged to disk.
    ``settings`` carry serve's model allow-list (none: any catalog model)."""
    path = validation.spool(store, file_id, folder)
    checked = validation.check_lines(path, endpoint, settings)
    staged = folder / "staged.jsonl"
    total = 0
    with open(staged, "w", encoding="utf-8") as out:
        for row in validation.Rows(path, checked):  # the reader's errors are collected even when pass one found some
            if checked.errors:
                continue
            out.write(json.dumps([row.line, row.custom_id, row.prompt_chars, row.to_payload()], ensure_ascii=False))
            out.write("\n")
            total += 1
    if not checked.errors and not total:
        checked.add(0, "no request lines", None, "empty_file")
    if not checked.errors and checked.model is None:
        checked.add(0, "no line names a model in body.model", "body.model", "missing_model")
    return Parsed(checked, staged, total, validation.chunk_size(path))


def staged_rows(path: Path) -> Iterator[tuple[store_ingest.StagedRow, int]]:
    """The staged rows back, each with its size in bytes (what a slice is measured by)."""
    with open(path, encoding="utf-8") as fh:
        for text in fh:
            line, custom_id, chars, payload = json.loads(text)
            yield store_ingest.StagedRow(line, custom_id, chars, payload), len(text)


class _Stopped(Exception):
    """The batch left ``validating`` (cancelled) or another driver took its lease: stop, roll back this slice."""


class Ingest:
    """Stores one parsed batch as a job in short transactions (see the module's docstring)."""

    def __init__(
        self,
        store: Store,
        holder: str,
        lease_seconds: float,
        slice_rows: int = SLICE_ROWS,
        *,
        engine: str = DEFAULT_ENGINE,
    ) -> None:
        self.store = store
        self.holder = holder
        self.lease_seconds = lease_seconds
        self.slice_rows = slice_rows
        self.engine = engine  # the workers' engine is part of the job's queue

    def run(self, batch_id: str, parsed: Parsed) -> bool:
        """True when the batch is in progress; False when it was cancelled or taken over meanwhile."""
        try:
            found = self._job(batch_id, parsed)
            if found is None:
                return False
            job_id, chunk_size, done = found
            placer = store_ingest.Placer(job_id, chunk_size)
            batch: list[dict[str, Any]] = []
            size = 0
            for row, nbytes in staged_rows(parsed.staged):
                rec = placer.record(row)
                if rec["seq"] < done:
                    continue  # stored by a driver that died mid-ingest
                batch.append(rec)
                size += nbytes
                if len(batch) >= self.slice_rows or size >= SLICE_BYTES:
                    self._slice(batch_id, batch)
                    batch, size = [], 0
            self._slice(batch_id, batch)
            return self._seal(batch_id, job_id, placer.spans(), parsed.total)
        except _Stopped:
            log.info("batch %s: ingest stopped (cancelled, or another process took it over)", batch_id)
            return False

    def _job(self, batch_id: str, parsed: Parsed) -> tuple[str, int, int] | None:
        """The batch's job, made and attached now or by a driver that died mid-ingest: (id, chunk size, rows
        already stored). None when that job was cancelled (or deleted) outside the API: so is the batch."""
        model = parsed.checked.model
        assert model is not None
        with self.store.session() as s:
            b = store_batches.claim(s, batch_id, self.holder, self.lease_seconds, (BatchStatus.VALIDATING,))
            if b is None:
                raise _Stopped
            if b.job_id is not None:
                job = s.get(Job, b.job_id)
                if job is None or job.state != JobState.INGESTING:
                    store_batches.request_cancel(s, batch_id)
                    return None
                return job.id, job.chunk_size, store_ingest.rows_stored(s, job.id)
            family, quant = validation._catalog_model(model)
            job = store_jobs.create_job(
                s,
                key=validation.job_key(batch_id),
                owner=b.owner,
                name=f"{batch_id} ({b.input_file_id})",
                family=family,
                queue=queue_for(family, quant, engine=self.engine),
                chunk_size=parsed.chunk_size,
                pinned_variant=f"{family}:{quant}" if quant else None,
                options={"model": model, "batch_id": batch_id, "no_cache": False, "engine": self.engine},
            )
            if not store_batches.attach_job(s, batch_id, self.holder, job.id, model):
                raise _Stopped
            return job.id, job.chunk_size, 0

    def _slice(self, batch_id: str, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        with self.store.session() as s:
            if store_batches.claim(s, batch_id, self.holder, self.lease_seconds, (BatchStatus.VALIDATING,)) is None:
                raise _Stopped
            store_ingest.append_rows(s, records)

    def _seal(self, batch_id: str, job_id: str, spans: list[tuple[int, int]], total: int) -> bool:
        """The batch first, then its job: the order a cancel takes its locks in (no deadlock on Postgres)."""
        with self.store.session() as s:
            if not store_batches.start(s, batch_id, self.holder, total):
                return False  # cancelled, or expired meanwhile: the driver's next pass expires it
            if not store_ingest.seal(s, job_id, spans, total):
                raise _Stopped  # the job was cancelled outside the API; roll the batch back to validating
        log.info("batch %s: job %s with %d rows", batch_id, job_id, total)
        return True

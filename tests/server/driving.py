"""Driving batches through the store by hand: a batch from lines, a worker's answers, a store that lets a test
act between the driver's transactions (the only places another process can act on SQLite or Postgres)."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from tests.server.helpers import CHAT, chat_line, jsonl
from tokenmill.store import Store, leases
from tokenmill.store import batches as store_batches
from tokenmill.store import files as store_files
from tokenmill.store import jobs as store_jobs
from tokenmill.store.results import write_result
from tokenmill.store.tables import ApiBatch, ApiFile, Chunk, Job

FINAL = {"failed", "completed", "expired", "cancelled"}


def new_batch(store: Store, n: int = 3, *, owner: str = "tenant-a", data: bytes | None = None) -> str:
    """A batch of ``n`` chat lines (or ``data``), still ``validating``; its id."""
    f = store_files.create_file(
        store, owner=owner, filename="in.jsonl", purpose="batch",
        source=io.BytesIO(data if data is not None else jsonl([chat_line(i) for i in range(n)])),
    )  # fmt: skip
    with store.session() as s:
        return store_batches.create_batch(
            s, owner=owner, endpoint=CHAT, input_file_id=f.id, completion_window="24h", metadata=None,
            idempotency_key=None,
        ).id  # fmt: skip


def batch(store: Store, batch_id: str) -> ApiBatch:
    with store.session() as s:
        b = s.get(ApiBatch, batch_id)
        assert b is not None
        return b


def job_state(store: Store, job_id: str | None) -> str | None:
    if job_id is None:
        return None
    with store.session() as s:
        return store_jobs.state_of(s, job_id)


def output_files(store: Store, batch_id: str) -> dict[str, int]:
    """How many output and error files of the batch anyone can see (each must be at most one, ever)."""
    with store.session() as s:
        rows = s.execute(
            select(ApiFile.filename, func.count())
            .where(
                ApiFile.filename.in_([f"{batch_id}_output.jsonl", f"{batch_id}_error.jsonl"]),
                ApiFile.status == "processed",
            )
            .group_by(ApiFile.filename)
        ).all()
    return {name.rsplit("_", 1)[1].split(".")[0]: int(n) for name, n in rows}


def expire(store: Store, batch_id: str) -> None:
    """The batch's completion window runs out now (the store's clock, not a sleep)."""
    with store.session() as s:
        s.execute(update(ApiBatch).where(ApiBatch.id == batch_id).values(expires_at=time.time() - 1))


def lease_runs_out(store: Store, batch_id: str) -> None:
    """The driver holding the batch is presumed dead: its lease ran out."""
    with store.session() as s:
        s.execute(update(ApiBatch).where(ApiBatch.id == batch_id).values(lease_until=0.0))


def take_chunk(store: Store, job_id: str, worker: str = "w-test") -> bool:
    """A worker claims the job's first waiting chunk (a live lease the finalizer waits for); False if none."""
    with store.session() as s:
        ids = list(s.scalars(select(Chunk.id).where(Chunk.job_id == job_id, Chunk.state == "pending")))
        return any(leases.claim(s, chunk_id, worker, 60.0, job_id=job_id) is not None for chunk_id in ids[:1])


def answer_taken(store: Store, job_id: str, worker: str = "w-test") -> None:
    """The worker answers every row of the chunks it holds, completes them, and the job finishes if done."""
    with store.session() as s:
        for chunk in list(s.scalars(select(Chunk).where(Chunk.job_id == job_id, Chunk.lease_owner == worker,
                                                        Chunk.state == "running"))):  # fmt: skip
            for seq in range(chunk.first_seq, chunk.last_seq + 1):
                _answer(s, job_id, seq)
            leases.complete(s, chunk.id, worker)
        store_jobs.finish_jobs(s, [job_id])


def run_job(store: Store, job_id: str) -> None:
    """A worker runs the whole job to the end (no-op unless it is queued or running)."""
    while take_chunk(store, job_id):
        answer_taken(store, job_id)
    answer_taken(store, job_id)


def _answer(s: Session, job_id: str, seq: int) -> None:
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "blue"}}]}
    write_result(s, {"job_id": job_id, "seq": seq, "custom_id": f"req-{seq}", "status": "succeeded", "body": body,
                     "prompt_tokens": 5, "completion_tokens": 1})  # fmt: skip


def the_job(store: Store, batch_id: str) -> Job | None:
    with store.session() as s:
        b = s.get(ApiBatch, batch_id)
        return s.get(Job, b.job_id) if b is not None and b.job_id else None


class HookedStore(Store):
    """The same store, calling ``hook`` before each transaction it opens: a test acts there, between two of
    the driver's transactions, as a concurrent request or process would."""

    def __init__(self, inner: Store, hook: Callable[[], None]) -> None:
        self.__dict__.update(inner.__dict__)
        self.hook = hook

    @contextmanager
    def session(self) -> Iterator[Session]:
        self.hook()
        with super().session() as s:
            yield s


def before_nth(n: int, action: Callable[[], Any]) -> Callable[[], None]:
    """A hook that runs ``action`` once, before the ``n``-th transaction (1-based)."""
    calls = {"n": 0}

    def hook() -> None:
        calls["n"] += 1
        if calls["n"] == n:
            action()

    return hook

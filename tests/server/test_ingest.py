"""Uploads, ingest and finalizing keep SQLite's one write lock only briefly: another writer (a worker's
results, a heartbeat, the dispatcher) never waits long while a large batch is stored or its files built."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import update

from tests.server.driving import batch, new_batch
from tests.server.helpers import chat_line, jsonl
from tokenmill.config import Settings
from tokenmill.server.driver import BatchDriver
from tokenmill.store import Store
from tokenmill.store import jobs as store_jobs
from tokenmill.store.results import write_results
from tokenmill.store.tables import Chunk

ROWS = 40_000
# Generous: one slice of rows or one 1 MiB chunk commits in tens of milliseconds; holding the lock for a
# whole upload or ingest took seconds, and past 15 s the dispatcher expires busy workers' leases.
MAX_WAIT_S = 1.5


class OtherWriter(threading.Thread):
    """Small write transactions in a loop on a connection of its own, timing how long each waits."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path, self.waits, self.stop = path, [0.0], threading.Event()

    def run(self) -> None:
        conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        conn.execute("CREATE TABLE IF NOT EXISTS probe (at REAL)")
        while not self.stop.is_set():
            started = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO probe VALUES (?)", (started,))
            conn.execute("COMMIT")
            self.waits.append(time.perf_counter() - started)
            time.sleep(0.005)
        conn.close()


def _longest_wait(store: Store, action: Callable[[], None]) -> float:
    assert store.sqlite_path is not None
    other = OtherWriter(store.sqlite_path)
    other.start()
    try:
        action()
    finally:
        other.stop.set()
        other.join(30)
    assert len(other.waits) > 10
    return max(other.waits)


def _answer_all(store: Store, job_id: str) -> None:
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "blue " * 40}}]}
    with store.session() as s:
        for first in range(0, ROWS, 500):
            write_results(s, [{"job_id": job_id, "seq": i, "custom_id": f"req-{i}", "status": "succeeded",
                               "body": body, "prompt_tokens": 60, "completion_tokens": 40}
                              for i in range(first, min(first + 500, ROWS))])  # fmt: skip
        s.execute(update(Chunk).where(Chunk.job_id == job_id).values(state="done"))
        store_jobs.finish_jobs(s, [job_id])


@pytest.mark.timeout(300)
def test_a_large_batch_never_makes_another_writer_wait_long(store: Store, settings: Settings) -> None:
    lines = [chat_line(i) for i in range(ROWS)]
    for line in lines:
        line["body"]["messages"][0]["content"] += " Say it plainly, in one word, without punctuation." * 8
    data = jsonl(lines)
    driver = BatchDriver(store, settings)
    ids: list[str] = []

    def upload_and_ingest() -> None:
        ids.append(new_batch(store, data=data))
        driver.tick()

    ingest = _longest_wait(store, upload_and_ingest)
    b = batch(store, ids[0])
    assert b.status == "in_progress" and b.total == ROWS and b.job_id
    _answer_all(store, b.job_id)
    finalize = _longest_wait(store, driver.tick)
    b = batch(store, ids[0])
    assert b.status == "completed" and b.completed == ROWS
    print(f"{len(data) / 2**20:.1f} MiB, {ROWS} rows: another writer waited at most {ingest:.3f}s during upload "
          f"and ingest, {finalize:.3f}s while the output file was built")  # fmt: skip
    assert ingest < MAX_WAIT_S and finalize < MAX_WAIT_S, (ingest, finalize)


def test_the_probe_would_see_a_long_transaction(store: Store, tmp_path: Path) -> None:
    """The measure itself: a write transaction held for a while shows up as the other writer's wait."""
    assert store.sqlite_path is not None
    other = OtherWriter(store.sqlite_path)
    other.start()
    time.sleep(0.1)
    holder = sqlite3.connect(store.sqlite_path, timeout=60, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    time.sleep(MAX_WAIT_S + 0.3)
    holder.execute("COMMIT")
    holder.close()
    time.sleep(0.1)
    other.stop.set()
    other.join(30)
    assert max(other.waits) >= MAX_WAIT_S

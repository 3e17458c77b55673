"""A loaded worker's first chunk straight from the store (workers/first_claim.py), against real SQLite and
Postgres: taken without a message, never run twice when its message comes too, and only until Celery consumes.

The scripted engine of test_runtime_claims stands in for llama.cpp; the runtime, store and claim are real.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from sqlalchemy import select

from tests.conftest import wait_for
from tests.workers.test_runtime_claims import ScriptedEngine, chunk_ids, make_job, results, runtime
from tests.workers.test_runtime_claims import store as store  # the sqlite + postgres fixture
from tokenmill.config import Settings
from tokenmill.engine import OnDone, Refill
from tokenmill.rows import DatasetRow
from tokenmill.store import Store, leases
from tokenmill.store.states import ChunkState
from tokenmill.store.tables import Chunk
from tokenmill.workers.first_claim import FirstClaim

QUEUES = ["tm.fam"]


class GatedEngine(ScriptedEngine):
    """Holds its first batch until ``gate`` is set, so a test can act while a chunk is running."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.running = threading.Event()

    def generate(
        self, rows: Sequence[DatasetRow], on_done: OnDone, should_stop: Callable[[], bool], refill: Refill | None = None
    ) -> None:
        self.running.set()
        self.gate.wait(30)
        super().generate(rows, on_done, should_stop, refill)


def chunk_states(store: Store, job_id: str) -> list[str]:
    with store.session() as s:
        return [str(c) for c in s.scalars(select(Chunk.state).where(Chunk.job_id == job_id).order_by(Chunk.idx))]


def test_the_oldest_waiting_chunk_is_taken_without_a_message(store: Store, settings: Settings) -> None:
    older = make_job(store, 4, 2, tag="a")
    make_job(store, 4, 2, tag="b")
    make_job(store, 4, 2, queue="tm.other", tag="c")  # a queue this worker does not serve
    rt = runtime(store, settings, ScriptedEngine())
    first = FirstClaim(rt, store, QUEUES, poll=0.01)
    first.start()
    wait_for(lambda: first.outcome is not None, 30, "the direct claim")
    first.stop()
    assert first.outcome is not None and first.outcome.claimed and first.outcome.generated == 2
    assert chunk_states(store, older) == [ChunkState.DONE, ChunkState.PENDING]
    assert [r.custom_id for r in results(store, older)] == ["r0", "r1"]
    with store.session() as s:  # it took one chunk only: the rest is the dispatcher's to hand out
        assert leases.first_waiting(s, QUEUES) == (older, chunk_ids(store, older)[1])
        assert leases.first_waiting(s, ["tm.nobody"]) is None


def test_the_message_for_the_direct_chunk_waits_and_is_dropped(store: Store, settings: Settings) -> None:
    """The lease's owner may claim its own running chunk again: the task must not run beside it."""
    job_id = make_job(store, 2, 2)
    engine = GatedEngine()
    first = FirstClaim(runtime(store, settings, engine), store, QUEUES, poll=0.01)
    first.start()
    assert engine.running.wait(30)
    delivered: list[bool] = []
    chunk_id = chunk_ids(store, job_id)[0]
    message = threading.Thread(target=lambda: delivered.append(first.process_chunk(job_id, chunk_id).claimed))
    message.start()
    message.join(0.3)
    assert message.is_alive() and delivered == []  # waiting for the direct chunk, not running it again
    engine.gate.set()
    message.join(30)
    first.stop()
    assert delivered == [False]  # done by then: the duplicate is dropped
    assert engine.tries == {"r0": 1, "r1": 1}
    assert len(results(store, job_id)) == 2


def test_no_direct_claim_once_celery_consumes(store: Store, settings: Settings) -> None:
    rt = runtime(store, settings, ScriptedEngine())
    first = FirstClaim(rt, store, QUEUES, poll=0.01)
    first.start()
    first.consuming()
    first.stop()
    job_id = make_job(store, 2, 2)
    assert first.outcome is None
    assert chunk_states(store, job_id) == [ChunkState.PENDING]
    assert first.process_chunk(job_id, chunk_ids(store, job_id)[0]).generated == 2  # messages still run

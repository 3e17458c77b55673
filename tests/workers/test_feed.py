"""Continuous batching across chunks, at the runtime: one task serves the job's next chunks as it drains.

Real SQLite and Postgres stores and the real runtime, feed and writer; the scripted engine of
``test_runtime_claims`` answers rows (what is under test is which chunks are claimed, completed and handed
back, not generation; the real engine's refill is tested in tests/engines/test_llama.py).
"""

from __future__ import annotations

from sqlalchemy import select

from tests.workers.test_runtime_claims import ScriptedEngine, chunk_ids, make_job, results, runtime, store
from tokenmill.config import Settings
from tokenmill.store import Store, leases
from tokenmill.store.tables import Chunk, Job

__all__ = ["store"]  # the parametrised (SQLite, Postgres) fixture


def chunks(s_: Store, job_id: str) -> list[tuple[str, str | None]]:
    with s_.session() as s:
        return [
            (c.state, c.lease_owner) for c in s.scalars(select(Chunk).where(Chunk.job_id == job_id).order_by(Chunk.idx))
        ]


def test_one_task_claims_and_completes_the_jobs_next_chunks(store: Store, settings: Settings) -> None:
    job = make_job(store, 20, 5)
    first, *_ = chunk_ids(store, job)
    engine = ScriptedEngine()
    outcome = runtime(store, settings, engine).process_chunk(job, first)
    assert (outcome.chunks, outcome.generated, outcome.stopped) == (4, 20, None)
    assert set(engine.tries.values()) == {1} and len(engine.tries) == 20  # every row once
    assert [r.custom_id for r in results(store, job)] == [f"r{i}" for i in range(20)]
    assert [state for state, _ in chunks(store, job)] == ["done"] * 4


def test_chunks_another_worker_holds_are_left_to_it(store: Store, settings: Settings) -> None:
    job = make_job(store, 20, 5)
    first, _, third, _ = chunk_ids(store, job)
    with store.session() as s:
        assert leases.claim(s, third, "w2", lease_seconds=60) is not None  # a live lease elsewhere
    engine = ScriptedEngine()
    outcome = runtime(store, settings, engine).process_chunk(job, first)
    assert outcome.chunks == 3 and not {f"r{i}" for i in range(10, 15)} & set(engine.tries)
    assert chunks(store, job) == [("done", "w1"), ("done", "w1"), ("running", "w2"), ("done", "w1")]


def test_a_stop_hands_back_every_chunk_the_task_holds(store: Store, settings: Settings) -> None:
    job = make_job(store, 20, 5)
    first, *_ = chunk_ids(store, job)
    engine = ScriptedEngine(fail={"r7"})
    rt = runtime(store, settings, engine)
    engine.on_fail = lambda: rt.stop_current("shutdown")  # told to stop while serving the second chunk
    outcome = rt.process_chunk(job, first)
    assert outcome.stopped == "shutdown"
    states = chunks(store, job)
    assert states[0] == ("done", "w1")
    assert all(owner is None and state == "pending" for state, owner in states[1:])  # reopened at once
    stored = {r.custom_id for r in results(store, job)}
    assert {f"r{i}" for i in range(5)} <= stored and "r7" not in stored


def test_with_chaining_off_a_task_serves_only_its_messages_chunk(store: Store, settings: Settings) -> None:
    job = make_job(store, 10, 5)
    first, _ = chunk_ids(store, job)
    outcome = runtime(store, settings.with_(chain_chunks=False), ScriptedEngine()).process_chunk(job, first)
    assert (outcome.chunks, outcome.generated) == (1, 5)
    assert [state for state, _ in chunks(store, job)] == ["done", "pending"]


def test_slot_use_is_added_to_the_job(store: Store, settings: Settings) -> None:
    job = make_job(store, 5, 5)
    (first,) = chunk_ids(store, job)
    engine = ScriptedEngine()
    engine.slot_use.steps, engine.slot_use.filled, engine.slot_use.slots = 10, 6, 10  # before this task
    step = engine.generate

    def generate(*args: object, **kw: object) -> None:
        step(*args, **kw)  # type: ignore[arg-type]
        use = engine.slot_use
        use.steps, use.filled, use.slots = use.steps + 4, use.filled + 3, use.slots + 4

    engine.generate = generate  # type: ignore[method-assign]
    runtime(store, settings, engine).process_chunk(job, first)
    with store.session() as s:
        row = s.get(Job, job)
        assert row is not None and (row.decode_steps, row.slot_steps, row.filled_slot_steps) == (4, 4, 3)


def test_a_task_yields_to_another_job_waiting_on_the_queue(store: Store, settings: Settings) -> None:
    first = make_job(store, 10, 5, tag="a")
    second = make_job(store, 10, 5, tag="b")
    a0, a1 = chunk_ids(store, first)
    outcome = runtime(store, settings, ScriptedEngine()).process_chunk(first, a0)
    assert outcome.chunks == 1  # the second job has chunks waiting and none running: the task ends
    assert [state for state, _ in chunks(store, first)] == ["done", "pending"]
    b0, _ = chunk_ids(store, second)
    with store.session() as s:
        assert leases.claim(s, a1, "w9", lease_seconds=60) is not None  # the first job runs elsewhere again
    assert runtime(store, settings, ScriptedEngine(), "w2").process_chunk(second, b0).chunks == 2  # balanced

"""The worker runtime's claim against a real SQLite store: message pairing, chunk and row attempt caps.

A scripted engine stands in for llama.cpp (these tests are about what the runtime stores, not about
generation); everything else is the real runtime, store and tables, in this process.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import pytest
from sqlalchemy import select, update

from tokenmill.config import Settings
from tokenmill.engine import Generation, OnDone, Refill, RowQueue, SlotUse
from tokenmill.rows import CHAT, DatasetRow, SamplingParams
from tokenmill.store import Store, leases
from tokenmill.store import jobs as store_jobs
from tokenmill.store import workers as store_workers
from tokenmill.store.tables import Chunk, Job, Result
from tokenmill.workers.runtime import WorkerRuntime

QUEUE = "tm.fam"


class ScriptedEngine:
    """Answers every row, except that rows whose custom_id is in ``fail`` raise a retryable error."""

    variant = "fam:q4"
    n_ctx = 2048
    load_ms = 1.0
    n_seq = 1
    n_threads = 1
    slot_use = SlotUse()

    def __init__(self, fail: set[str] | None = None, on_fail: Callable[[], None] | None = None) -> None:
        self.fail = fail or set()
        self.on_fail = on_fail
        self.tries: Counter[str] = Counter()

    def generate(
        self, rows: Sequence[DatasetRow], on_done: OnDone, should_stop: Callable[[], bool], refill: Refill | None = None
    ) -> None:
        queue = RowQueue(rows, refill, low_water=1)
        while not should_stop():
            queue.top_up(idle=True)
            if queue.done:
                return
            row = queue.rows.popleft()
            self.tries[row.custom_id] += 1
            if row.custom_id in self.fail:
                on_done(row, RuntimeError(f"scripted failure of {row.custom_id}"))
                if self.on_fail is not None:
                    self.on_fail()
                continue
            on_done(row, Generation(text=f"ok:{row.custom_id}", finish_reason="stop", prompt_tokens=3,
                                    completion_tokens=2, total_ms=1.0))  # fmt: skip

    def close(self) -> None:
        pass


def dataset(n: int, tag: str = "") -> list[DatasetRow]:
    return [
        DatasetRow(
            line=i + 1,
            custom_id=f"r{i}",
            endpoint=CHAT,
            messages=({"role": "user", "content": f"question {tag}{i}"},),
            params=SamplingParams(max_tokens=4, temperature=0.7),  # not cacheable: every row is generated
        )
        for i in range(n)
    ]


def make_job(store: Store, n: int, chunk_size: int, queue: str = QUEUE, tag: str = "") -> str:
    with store.session() as s:
        job = store_jobs.create_job(s, key=f"k{tag}", name="t.jsonl", family="fam", queue=queue, chunk_size=chunk_size)
        store_jobs.ingest_rows(s, job, dataset(n, tag))
        return job.id


def chunk_ids(store: Store, job_id: str) -> list[int]:
    with store.session() as s:
        return list(s.scalars(select(Chunk.id).where(Chunk.job_id == job_id).order_by(Chunk.idx)))


def results(store: Store, job_id: str) -> list[Result]:
    with store.session() as s:
        return list(s.scalars(select(Result).where(Result.job_id == job_id).order_by(Result.seq)))


def runtime(store: Store, settings: Settings, engine: ScriptedEngine, worker_id: str = "w1") -> WorkerRuntime:
    with store.session() as s:
        store_workers.register(s, id=worker_id, name=worker_id, host="h", pid=1, state="ready", queues=[QUEUE])
    return WorkerRuntime(settings=settings, store=store, engine=engine, worker_id=worker_id, model_id="m")


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Store]:
    """Real SQLite (embedded) and real Postgres (fleet): the claim is one statement on both."""
    url = settings.database_url if request.param == "sqlite" else request.getfixturevalue("pg_url")
    s = Store(url)
    s.migrate()
    yield s
    s.dispose()


def test_a_message_pairing_another_jobs_chunk_is_dropped(
    store: Store, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    job_a = make_job(store, 4, 4, tag="a")
    job_b = make_job(store, 4, 4, tag="b")
    (chunk_a,) = chunk_ids(store, job_a)
    engine = ScriptedEngine()
    rt = runtime(store, settings, engine)
    with caplog.at_level(logging.WARNING, logger="tokenmill.workers.runtime"):
        outcome = rt.process_chunk(job_b, chunk_a)  # forged or stale: B's id, A's chunk
    assert not outcome.claimed
    assert f"chunk {chunk_a} belongs to job {job_a}, not to job {job_b}" in caplog.text
    assert results(store, job_a) == [] and results(store, job_b) == [] and sum(engine.tries.values()) == 0
    with store.session() as s:
        chunk = s.get(Chunk, chunk_a)
        assert chunk is not None and (chunk.state, chunk.lease_owner, chunk.attempts) == ("pending", None, 0)
    assert rt.process_chunk(job_a, chunk_a).generated == 4  # the true pairing still runs
    assert [r.custom_id for r in results(store, job_a)] == ["r0", "r1", "r2", "r3"]


def test_a_job_on_a_queue_this_worker_does_not_serve_is_not_claimed(
    store: Store, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    other = make_job(store, 2, 2, queue="tm.other-model", tag="o")
    (chunk,) = chunk_ids(store, other)
    rt = runtime(store, settings, ScriptedEngine())
    with caplog.at_level(logging.WARNING, logger="tokenmill.workers.runtime"):
        assert not rt.process_chunk(other, chunk).claimed
    assert "which this worker does not serve (tm.fam)" in caplog.text
    assert results(store, other) == []
    with store.session() as s:
        job = s.get(Job, other)
        assert job is not None and job.state == "queued"  # not started by a worker that cannot run it


class Died(BaseException):
    """What a worker process dying looks like from inside it: nothing after this point runs."""


class PoisonEngine(ScriptedEngine):
    """Its process "dies" (raises Died out of the task) whenever row ``r1`` is in the batch."""

    def generate(
        self, rows: Sequence[DatasetRow], on_done: OnDone, should_stop: Callable[[], bool], refill: Refill | None = None
    ) -> None:
        for row in rows:
            self.tries[row.custom_id] += 1
        if any(r.custom_id == "r1" for r in rows):
            raise Died()
        super().generate(rows, on_done, should_stop, refill)


def test_a_chunk_whose_workers_die_with_it_is_tried_row_by_row_and_only_the_poison_row_fails(
    store: Store, settings: Settings
) -> None:
    settings = settings.with_(max_chunk_attempts=2, max_row_attempts=2)
    job = make_job(store, 6, 3)
    poison, healthy = chunk_ids(store, job)
    deaths = 0
    for n in range(12):  # a supervisor restarting the worker each time it dies (bounded)
        rt = runtime(store, settings, PoisonEngine(), f"w{n}")
        try:
            rt.process_chunk(job, poison)
            break
        except Died:
            deaths += 1
            with store.session() as s:  # the dead process's lease runs out
                s.execute(update(Chunk).where(Chunk.id == poison).values(lease_expires_at=0))
        finally:
            rt.writer.close()
    # two deaths in a batch, then one per try of the poison row alone (two tries), then it fails alone
    assert deaths == 4
    rt = runtime(store, settings, PoisonEngine(), "w-last")
    assert rt.process_chunk(job, healthy).generated == 3  # the job goes on
    rt.close()
    stored = results(store, job)
    assert [(r.seq, r.status, r.error_code) for r in stored] == [
        (0, "succeeded", None), (1, "failed", "worker_died"), (2, "succeeded", None),
        (3, "succeeded", None), (4, "succeeded", None), (5, "succeeded", None),
    ]  # fmt: skip
    with store.session() as s:
        assert store_jobs.state_of(s, job) == "completed_with_errors"


def test_a_chunk_claimed_past_every_bound_fails_its_unanswered_rows_and_the_job_goes_on(
    store: Store, settings: Settings
) -> None:
    """The backstop: claims past max_chunk_attempts plus what row-by-row tries can take give the chunk up."""
    settings = settings.with_(max_chunk_attempts=2, max_row_attempts=1)
    job = make_job(store, 6, 3)
    poison, healthy = chunk_ids(store, job)
    limit = leases.give_up_after(2, 3, 1)
    for n in range(limit):  # workers took it and died (the lease ran out) without recording any try
        with store.session() as s:
            assert leases.claim(s, poison, f"dead{n}", lease_seconds=-1) is not None
    engine = ScriptedEngine()
    rt = runtime(store, settings, engine)
    outcome = rt.process_chunk(job, poison)  # one claim past the bound
    assert (outcome.claimed, outcome.generated, outcome.failed) == (True, 0, 3)
    assert sum(engine.tries.values()) == 0  # nothing was generated for the poison chunk
    assert rt.process_chunk(job, healthy).generated == 3  # the job goes on
    stored = results(store, job)
    assert [(r.seq, r.status, r.error_code) for r in stored[:3]] == [
        (i, "failed", "chunk_attempts_exhausted") for i in range(3)
    ]
    assert f"claimed {limit + 1} times (limit {limit})" in (stored[0].error or "")
    assert [r.status for r in stored[3:]] == ["succeeded"] * 3
    with store.session() as s:
        assert [c.state for c in s.scalars(select(Chunk).where(Chunk.job_id == job))] == ["done", "done"]
        j = store_jobs.get_job(s, job)
        assert j.state == "completed_with_errors" and j.finished_at is not None
        assert store_jobs.finish_jobs(s) == []
        assert store_jobs.retry_failed(s, j) == 3  # an explicit retry starts the count again
    assert rt.process_chunk(job, poison).generated == 3


def test_row_attempts_count_across_deliveries(store: Store, settings: Settings) -> None:
    settings = settings.with_(max_row_attempts=3)
    job = make_job(store, 3, 3)
    (chunk,) = chunk_ids(store, job)
    first = ScriptedEngine(fail={"r1"})
    rt1 = runtime(store, settings, first, "w1")
    first.on_fail = lambda: rt1.stop_current("shutdown")  # the first worker is told to stop after one try
    out1 = rt1.process_chunk(job, chunk)
    assert out1.stopped == "shutdown" and first.tries["r1"] == 1
    second = ScriptedEngine(fail={"r1"})
    rt2 = runtime(store, settings, second, "w2")
    out2 = rt2.process_chunk(job, chunk)  # redelivered to another worker
    assert out2.failed == 1
    assert first.tries["r1"] + second.tries["r1"] == 3  # three tries in all, not three per delivery
    (failed,) = [r for r in results(store, job) if r.status == "failed"]
    assert (failed.custom_id, failed.attempts, failed.error_code) == ("r1", 3, "generation_failed")


def test_the_chunk_attempt_cap_comes_from_the_environment_and_reaches_local_workers() -> None:
    settings = Settings.from_env({"TOKENMILL_MAX_CHUNK_ATTEMPTS": "7"})
    assert settings.max_chunk_attempts == 7
    assert Settings.from_env(settings.as_env()).max_chunk_attempts == 7
    assert Settings.from_env({}).max_chunk_attempts == 5


class SlowRowEngine(ScriptedEngine):
    """Row r1 runs past the per-row time limit (what the llama engine reports as RowTimeLimit)."""

    def generate(
        self, rows: Sequence[DatasetRow], on_done: OnDone, should_stop: Callable[[], bool], refill: Refill | None = None
    ) -> None:
        from tokenmill.errors import RowTimeLimit

        for row in rows:
            self.tries[row.custom_id] += 1
            if row.custom_id == "r1":
                on_done(row, RowTimeLimit("the row ran 9.0s, past the per-row limit of 5s"))
            else:
                on_done(row, Generation(text="ok", finish_reason="stop", prompt_tokens=1, completion_tokens=1))


def test_a_row_past_its_time_limit_fails_alone_with_its_own_code_and_is_not_retried(
    store: Store, settings: Settings
) -> None:
    job = make_job(store, 3, 3)
    (chunk,) = chunk_ids(store, job)
    engine = SlowRowEngine()
    rt = runtime(store, settings, engine)
    outcome = rt.process_chunk(job, chunk)
    assert (outcome.generated, outcome.failed) == (2, 1)
    assert engine.tries["r1"] == 1
    stored = {r.custom_id: r for r in results(store, job)}
    assert stored["r1"].error_code == "row_time_limit_exceeded" and "per-row limit" in (stored["r1"].error or "")
    assert stored["r0"].status == stored["r2"].status == "succeeded"
    rt.close()

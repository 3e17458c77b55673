"""Hypothesis picks what happens between every two of the driver's transactions: a cancel, a worker taking or
answering chunks, the window running out, the driver dying, its lease running out, a second replica's pass.
A cancel is a request like the API's: it reads the batch at one boundary and writes one driver transaction
later. Whatever the schedule: a final batch never changes, a batch that ended without running to the end has its job
stopped, each output file is written at most once, and once the interference stops the batch ends."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.driving import (
    FINAL,
    HookedStore,
    answer_taken,
    batch,
    expire,
    job_state,
    lease_runs_out,
    new_batch,
    output_files,
    run_job,
    take_chunk,
    the_job,
)
from tokenmill.config import Settings
from tokenmill.server.batches import cancel_batch
from tokenmill.server.driver import BatchDriver
from tokenmill.server.errors import ApiError
from tokenmill.store import Store
from tokenmill.store import batches as store_batches

EVENTS = ("nothing",) * 6 + ("cancel", "take", "answer", "expire", "lease_out", "rival", "crash")
STOPPED_JOB = {"cancelled", "completed", "completed_with_errors", None}


class Crash(BaseException):
    """The driver's process dies between two transactions."""


class SlowCancel:
    """A cancel request in a thread that stops right after reading the batch, until :meth:`land` lets it write."""

    local = threading.local()

    def __init__(self, store: Store, batch_id: str) -> None:
        self.read, self.go = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(store, batch_id), daemon=True)
        self.thread.start()
        assert self.read.wait(30), "the cancel never read the batch"

    def _run(self, store: Store, batch_id: str) -> None:
        SlowCancel.local.pause = self
        try:
            with store.session() as s:
                cancel_batch(s, "tenant-a", batch_id)
        except ApiError:
            pass
        except BaseException as exc:
            self.error = exc
        finally:
            self.read.set()

    def land(self) -> None:
        self.go.set()
        self.thread.join(30)
        if self.error is not None:
            raise self.error

    @staticmethod
    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        real: Callable[..., Any] = store_batches.get_batch

        def get_batch(*args: Any, **kwargs: Any) -> Any:
            found = real(*args, **kwargs)
            pause = getattr(SlowCancel.local, "pause", None)
            if pause is not None:
                pause.read.set()
                pause.go.wait(30)
            return found

        monkeypatch.setattr(store_batches, "get_batch", get_batch)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[tuple[Store, Settings]]:
    cfg = Settings(data_dir=tmp_path_factory.mktemp("races") / ".tokenmill", models_dir=models_dir)
    store = Store(cfg.database_url)
    store.migrate()
    yield store, cfg
    store.dispose()


class Watch:
    """The invariants, checked after every event."""

    def __init__(self, store: Store, batch_id: str) -> None:
        self.store, self.batch_id = store, batch_id
        self.final: tuple[object, ...] | None = None

    def check(self) -> None:
        b = batch(self.store, self.batch_id)
        seen = (b.status, b.output_file_id, b.error_file_id, b.completed, b.failed)
        if self.final is not None:
            assert seen == self.final, f"a final batch changed: {self.final} -> {seen}"
        elif b.status in FINAL:
            self.final = seen
        if b.status in ("cancelled", "expired", "failed"):
            assert job_state(self.store, b.job_id) in STOPPED_JOB, f"{b.status} batch, job still running"
        assert all(n == 1 for n in output_files(self.store, self.batch_id).values())


@pytest.fixture(scope="module")
def slow_cancels() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        SlowCancel.patch(mp)
        yield


@pytest.mark.timeout(600)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_interleaving_keeps_the_batch_invariants(
    env: tuple[Store, Settings], data: st.DataObject, slow_cancels: None
) -> None:
    store, cfg = env
    batch_id = new_batch(store, 5)
    watch = Watch(store, batch_id)
    rival = BatchDriver(store, cfg)
    rival.slice_rows = 2
    pending: list[SlowCancel] = []

    def act() -> None:
        while pending:  # a cancel that read at the last boundary writes now, one driver transaction later
            pending.pop().land()
        event = data.draw(st.sampled_from(EVENTS))
        job = the_job(store, batch_id)
        if event == "cancel":
            pending.append(SlowCancel(store, batch_id))
        elif event == "take" and job is not None:
            take_chunk(store, job.id)
        elif event == "answer" and job is not None:
            answer_taken(store, job.id)
        elif event == "expire":
            expire(store, batch_id)
        elif event == "lease_out":
            lease_runs_out(store, batch_id)
        elif event == "rival":
            rival.tick()
        watch.check()
        if event == "crash":
            raise Crash

    def driver() -> BatchDriver:
        d = BatchDriver(HookedStore(store, act), cfg)
        d.slice_rows = 2
        return d

    current = driver()
    for _ in range(25):
        try:
            current.tick()
            act()
        except Crash:
            current = driver()  # a restarted process: a new holder, the dead one's lease still there
    while pending:
        pending.pop().land()
    watch.check()
    # The interference stops: workers run what is left, leases run out, and a plain driver ends the batch.
    plain = BatchDriver(store, cfg)
    for _ in range(6):
        lease_runs_out(store, batch_id)
        job = the_job(store, batch_id)
        if job is not None:
            run_job(store, job.id)
        plain.tick()
        watch.check()
    assert batch(store, batch_id).status in FINAL

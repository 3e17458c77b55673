"""The batch driver against a real store, its steps interleaved by hand with cancels, crashes and expiry."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from sqlalchemy import func, select

from tests.conftest import API_KEYS, InProcessServer
from tests.server.driving import (
    HookedStore,
    batch,
    expire,
    job_state,
    lease_runs_out,
    new_batch,
    output_files,
    run_job,
    the_job,
)
from tests.server.helpers import CHAT, chat_line, client, jsonl, upload
from tokenmill.config import Settings
from tokenmill.server import validation
from tokenmill.server.driver import HEAVY_STEPS_PER_TICK, BatchDriver
from tokenmill.store import Store
from tokenmill.store import batches as store_batches
from tokenmill.store import files as store_files
from tokenmill.store.tables import ApiBatch, Chunk, Job, RequestRow


class Crash(BaseException):
    """The driver's process dies here (no ``except Exception`` catches it)."""


def race_after_read(monkeypatch: pytest.MonkeyPatch, between: Any) -> None:
    """The next cancel request reads the batch, then ``between`` runs (the driver's step, committed), then
    the cancel writes: the order a blind read-then-write loses to."""
    armed = {"on": True}
    real = store_batches.get_batch

    def get_batch(*args: Any, **kwargs: Any) -> Any:
        found = real(*args, **kwargs)
        if armed.pop("on", False):
            between()
        return found

    monkeypatch.setattr(store_batches, "get_batch", get_batch)


def test_cancel_racing_validation_cancels_the_job_it_made(
    api_app: InProcessServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = client(api_app.url + "/v1", API_KEYS[0])
    b = c.batches.create(input_file_id=upload(c, jsonl([chat_line(i) for i in range(3)])), endpoint=CHAT,
                         completion_window="24h")  # fmt: skip
    driver = BatchDriver(api_app.store, api_app.settings)
    race_after_read(monkeypatch, driver.tick)  # validation stores the job between the cancel's read and write
    c.batches.cancel(b.id)
    driver.tick()
    done = batch(api_app.store, b.id)
    assert done.status == "cancelled"
    assert job_state(api_app.store, done.job_id) == "cancelled"  # not left to run with nobody to collect it
    assert done.error_file_id is not None and output_files(api_app.store, b.id) == {"error": 1}


def test_cancel_racing_completion_keeps_it_completed_with_one_output(
    api_app: InProcessServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = client(api_app.url + "/v1", API_KEYS[0])
    b = c.batches.create(input_file_id=upload(c, jsonl([chat_line(i) for i in range(2)])), endpoint=CHAT,
                         completion_window="24h")  # fmt: skip
    driver = BatchDriver(api_app.store, api_app.settings)
    driver.tick()
    job = the_job(api_app.store, b.id)
    assert job is not None
    run_job(api_app.store, job.id)
    race_after_read(monkeypatch, driver.tick)  # the driver completes it between the cancel's read and write
    with pytest.raises(openai.BadRequestError, match="already completed"):
        c.batches.cancel(b.id)
    driver.tick()
    driver.tick()
    done = batch(api_app.store, b.id)
    assert done.status == "completed" and done.cancelling_at is None
    assert output_files(api_app.store, b.id) == {"output": 1}


@pytest.mark.timeout(60)
def test_cancel_between_ingest_slices_stops_the_ingest_and_cancels_the_job(
    any_store: Store, settings: Settings
) -> None:
    from tokenmill.server.batches import cancel_batch

    store = any_store
    batch_id = new_batch(store, 9)
    seen: dict[str, int] = {}

    def hook() -> None:  # at the first transaction boundary after the job exists: a cancel request
        job = the_job(store, batch_id)
        if job is not None and not seen:
            with store.session() as s:
                cancel_batch(s, "tenant-a", batch_id)
                seen["rows"] = int(s.scalar(select(func.count()).where(RequestRow.job_id == job.id)) or 0)

    driver = BatchDriver(HookedStore(store, hook), settings)
    driver.slice_rows = 2
    driver.tick()
    b = batch(store, batch_id)
    assert b.status == "cancelled" and job_state(store, b.job_id) == "cancelled"
    with store.session() as s:
        stored = s.scalar(select(func.count()).where(RequestRow.job_id == b.job_id))
        chunks = s.scalar(select(func.count()).where(Chunk.job_id == b.job_id))
    assert stored == seen["rows"] < 9 and chunks == 0  # nothing stored after the cancel; never sealed
    BatchDriver(store, settings).tick()
    assert batch(store, batch_id).status == "cancelled"


@pytest.mark.timeout(60)
def test_a_driver_killed_mid_ingest_is_resumed_where_it_stopped(any_store: Store, settings: Settings) -> None:
    store = any_store
    lines = [chat_line(i, max_tokens=1 + i % 5) for i in range(11)]
    batch_id = new_batch(store, data=jsonl(lines))
    clean_id = new_batch(store, data=jsonl(lines))

    def crash() -> None:
        job = the_job(store, batch_id)
        with store.session() as s:
            stored = job is not None and s.scalar(select(func.count()).where(RequestRow.job_id == job.id))
        if stored and stored >= 4:
            raise Crash

    dying = BatchDriver(HookedStore(store, crash), settings)
    dying.slice_rows = 2
    with pytest.raises(Crash):
        dying.validate(batch_id)
    assert batch(store, batch_id).status == "validating"
    job = the_job(store, batch_id)
    assert job is not None and job.state == "ingesting"
    lease_runs_out(store, batch_id)
    BatchDriver(store, settings).tick()
    b = batch(store, batch_id)
    assert b.status == "in_progress" and b.total == 11 and b.job_id == job.id
    with store.session() as s:
        rows = s.execute(select(RequestRow.seq, RequestRow.line).where(RequestRow.job_id == job.id)
                         .order_by(RequestRow.seq)).all()  # fmt: skip
        spans = [s.execute(select(Chunk.idx, Chunk.first_seq, Chunk.last_seq).where(Chunk.job_id == j)
                           .order_by(Chunk.idx)).all() for j in (job.id, batch(store, clean_id).job_id)]  # fmt: skip
        assert s.scalar(select(func.count()).select_from(Job)) == 2
    assert [tuple(r) for r in rows] == [(i, i + 1) for i in range(11)]
    assert spans[0] == spans[1]  # the same chunks as an ingest that never stopped


def test_a_batch_left_mid_ingest_past_its_window_expires_and_its_job_is_cancelled(
    store: Store, settings: Settings
) -> None:
    batch_id = new_batch(store, 6)

    def crash() -> None:
        if the_job(store, batch_id) is not None:
            raise Crash

    with pytest.raises(Crash):
        BatchDriver(HookedStore(store, crash), settings).validate(batch_id)
    expire(store, batch_id)
    BatchDriver(store, settings).tick()
    b = batch(store, batch_id)
    assert b.status == "expired" and job_state(store, b.job_id) == "cancelled"


def test_expiry_applies_while_validating(store: Store, settings: Settings) -> None:
    batch_id = new_batch(store, 2)
    expire(store, batch_id)
    BatchDriver(store, settings).tick()
    b = batch(store, batch_id)
    assert b.status == "expired" and b.job_id is None and b.expired_at is not None


def test_a_line_that_breaks_the_parser_fails_the_batch_on_the_first_try(store: Store, settings: Settings) -> None:
    data = jsonl([chat_line(0)]) + b"[" * 100_000 + b"\n" + jsonl([chat_line(2)])
    batch_id = new_batch(store, data=data)
    BatchDriver(store, settings).tick()
    b = batch(store, batch_id)
    assert b.status == "failed" and b.errors and b.job_id is None


def test_any_unexpected_validation_error_fails_the_batch_once_with_a_message(
    store: Store, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def broken(*args: Any) -> Any:
        calls.append(1)
        raise RuntimeError("the parser broke on something")

    monkeypatch.setattr(validation, "check_lines", broken)
    batch_id = new_batch(store, 2)
    driver = BatchDriver(store, settings)
    driver.tick()
    driver.tick()
    b = batch(store, batch_id)
    assert b.status == "failed" and len(calls) == 1
    assert b.errors and "RuntimeError" in b.errors[0]["message"]


def test_a_batch_whose_step_keeps_failing_backs_off_and_others_go_on(
    store: Store, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import OperationalError

    bad = new_batch(store, 2, owner="tenant-a")
    good = new_batch(store, 2, owner="tenant-b")
    bad_file = batch(store, bad).input_file_id
    tries = []
    real = validation.spool

    def spool(st: Store, file_id: str, folder: Any) -> Any:
        if file_id == bad_file:  # a store error that will not go away (a replica's disk, a lock held elsewhere)
            tries.append(1)
            raise OperationalError("SELECT", {}, Exception("database is locked"))
        return real(st, file_id, folder)

    monkeypatch.setattr(validation, "spool", spool)
    driver = BatchDriver(store, settings)
    for _ in range(6):
        driver.tick()
    assert batch(store, good).status == "in_progress"
    assert batch(store, bad).status == "validating" and len(tries) <= 2  # not re-read on every pass


def test_one_pass_does_bounded_work_and_takes_tenants_in_turn(store: Store, settings: Settings) -> None:
    crowd = [new_batch(store, 2, owner="tenant-a") for _ in range(4)]
    late = new_batch(store, 2, owner="tenant-b")
    BatchDriver(store, settings).tick()
    moved = {b for b in [*crowd, late] if batch(store, b).status != "validating"}
    assert len(moved) == HEAVY_STEPS_PER_TICK and late in moved


def _first_chunk_ends_a_line() -> bytes:
    """Lines whose first MiB ends exactly at a newline, so a file cut after its first chunk is valid JSONL."""
    head = [json.dumps(chat_line(i)) + "\n" for i in range(3)]
    line = chat_line(3)
    size = sum(len(x) for x in head)
    base = len(json.dumps(line)) + 1
    line["body"]["messages"][0]["content"] += "x" * (store_files.CHUNK_BYTES - size - base)
    tail = [json.dumps(chat_line(i)) + "\n" for i in range(4, 8)]
    data = ("".join(head) + json.dumps(line) + "\n" + "".join(tail)).encode()
    assert data[store_files.CHUNK_BYTES - 1 : store_files.CHUNK_BYTES] == b"\n"
    return data


def test_an_input_file_deleted_mid_validation_fails_the_batch_clearly(
    store: Store, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch_id = new_batch(store, data=_first_chunk_ends_a_line())
    file_id = batch(store, batch_id).input_file_id
    real = store_files.stream

    def stream(st: Store, fid: str) -> Any:
        for i, block in enumerate(real(st, fid)):
            yield block
            if i == 0:  # the owner deletes the file while validation reads it
                with store.session() as s:
                    store_files.delete_file(s, fid)

    monkeypatch.setattr(store_files, "stream", stream)
    BatchDriver(store, settings).tick()
    b = batch(store, batch_id)
    assert b.status == "failed" and b.job_id is None
    assert b.errors and file_id in b.errors[0]["message"] and "deleted" in b.errors[0]["message"]


def test_a_final_batch_never_changes(store: Store, settings: Settings) -> None:
    from tokenmill.server.batches import cancel_batch
    from tokenmill.server.errors import ApiError

    batch_id = new_batch(store, 2)
    driver = BatchDriver(store, settings)
    driver.tick()
    job = the_job(store, batch_id)
    assert job is not None
    run_job(store, job.id)
    driver.tick()
    before = batch(store, batch_id)
    assert before.status == "completed"
    with store.session() as s:
        assert store_batches.request_cancel(s, batch_id).status is None
        assert not store_batches.fail(s, batch_id, driver.holder, [], 0)
        assert not store_batches.begin_finalizing(s, batch_id, driver.holder, store_batches.BatchStatus.CANCELLED)
    with pytest.raises(ApiError, match="already completed"), store.session() as s:
        cancel_batch(s, "tenant-a", batch_id)
    expire(store, batch_id)
    lease_runs_out(store, batch_id)
    for _ in range(2):
        driver.tick()
        BatchDriver(store, settings).tick()  # a second replica
    after = batch(store, batch_id)
    assert (after.status, after.output_file_id, after.completed_at) == (
        "completed", before.output_file_id, before.completed_at,
    )  # fmt: skip
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(ApiBatch)) == 1

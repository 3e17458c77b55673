"""The store's disk fills: one clear line naming the path, exit 6, an intact database, and the same
command works once space is freed."""

from __future__ import annotations

import errno
import json
import re
import sqlite3
import threading
from pathlib import Path

import pytest

from tests.conftest import STUB_ENV, WORKER_ENV, Procs, run_cli, wait_for
from tokenmill.celery_app import make_app
from tokenmill.config import Settings
from tokenmill.errors import StoreFull
from tokenmill.scheduler.dispatch import Dispatcher
from tokenmill.scheduler.submit import Submission, submit_dataset
from tokenmill.store import Store, leases
from tokenmill.workers.diskfull import FullWatch


def test_full_disk_is_a_clear_error_and_the_same_command_works_after(
    tmp_path: Path, settings: Settings, small_tmpfs: Path
) -> None:
    data = tmp_path / "many.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for i in range(10_000):
            fh.write(json.dumps({"id": f"r{i}", "prompt": "word " * 40 + str(i)}) + "\n")
    filler = small_tmpfs / "filler"
    filler.write_bytes(b"\0" * (10 * 1024 * 1024))  # 2 MiB left: the schema fits, the rows do not
    on_small = settings.with_(data_dir=small_tmpfs / "tm")
    db = small_tmpfs / "tm" / "tokenmill.db"

    proc = run_cli(on_small, "submit", str(data), timeout=120)
    assert proc.returncode == 6, proc.stderr
    message = " ".join(proc.stderr.split())
    assert "Traceback" not in message and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"disk is full at {db}" in message and "run the same command again" in message

    filler.unlink()
    check = sqlite3.connect(db)
    try:
        assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        # the ingest was one transaction: it rolled back, nothing half-stored
        assert check.execute("SELECT (SELECT count(*) FROM jobs) + (SELECT count(*) FROM requests)").fetchone() == (0,)
    finally:
        check.close()

    again = run_cli(on_small, "submit", str(data), timeout=120)
    assert again.returncode == 0, again.stderr
    check = sqlite3.connect(db)
    try:
        assert check.execute("SELECT total_rows, state FROM jobs").fetchall() == [(10_000, "queued")]
    finally:
        check.close()


def _fill(disk: Path) -> Path:
    """Write a filler file until the filesystem has no byte left (tmpfs: no reserved blocks)."""
    filler = disk / "filler-run"
    block = b"\0" * (256 * 1024)
    with open(filler, "wb", buffering=0) as fh:
        for size in (len(block), 4096, 1):
            try:
                while True:
                    fh.write(block[:size])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return filler


def _stored(db: Path) -> dict[str, str]:
    """custom id -> worker id of every stored result (read-only: the disk may be full)."""
    if not db.exists():
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return dict(con.execute("SELECT custom_id, worker_id FROM results"))
    except sqlite3.OperationalError:  # not migrated yet, or locked for a moment
        return {}
    finally:
        con.close()


def test_disk_filling_during_a_run_exits_6_and_the_same_command_resumes(
    tmp_path: Path, settings: Settings, small_tmpfs: Path, procs: Procs
) -> None:
    rows = 400
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"row {i} " + "x" * 200}) + "\n"
                            for i in range(rows)), encoding="utf-8")  # fmt: skip
    on_small = settings.with_(data_dir=small_tmpfs / "tm")
    db = small_tmpfs / "tm" / "tokenmill.db"
    gen_log = tmp_path / "generated.log"  # off the small disk: the stub's line per generation
    env = {**STUB_ENV, **WORKER_ENV, "TOKENMILL_STUB_DELAY": "0.02", "TOKENMILL_STUB_LOG": str(gen_log)}
    args = ("run", str(data), "--workers", "1", "--chunk-size", "25", "-o", str(tmp_path / "out.jsonl"))

    first = procs.start(on_small, *args, env=env, name="run")
    wait_for(lambda: len(_stored(db)) > 0 or first.poll() is not None, 60, "the first results", procs)
    filler = _fill(small_tmpfs)
    code = first.wait(timeout=60)  # bounded: a run that hangs on a full disk fails here
    stderr = (procs.logdir / "run-0.log").read_text(errors="replace")
    assert code == 6, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"disk is full at {db}" in " ".join(errors[0].split()), stderr

    kept = _stored(db)
    assert 0 < len(kept) < rows
    filler.unlink()
    check = sqlite3.connect(db)
    try:
        assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        check.close()
    before = gen_log.read_text().splitlines()

    again = run_cli(on_small, *args, env=env, timeout=120)
    assert again.returncode == 0, again.stderr
    after = _stored(db)
    assert sorted(after) == sorted(f"r{i}" for i in range(rows))  # every row, once (unique on job+seq)
    assert {cid: after[cid] for cid in kept} == kept  # what was stored stays as it was
    regenerated = [line.split()[1] for line in gen_log.read_text().splitlines()[len(before) :]]
    assert sorted(regenerated) == sorted(set(after) - set(kept))  # only the rows not stored before


def test_a_full_store_ends_runs_dispatch_loop_and_the_fleet_scheduler_waits_for_space(
    tmp_path: Path, settings: Settings, small_tmpfs: Path
) -> None:
    on_small = settings.with_(data_dir=small_tmpfs / "tm")
    store = Store(on_small.database_url)
    store.migrate()
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"row {i}"}) + "\n" for i in range(8)))
    job_id, _, _ = submit_dataset(store, Submission(path=data, model="smollm2-135m-instruct", chunk_size=4))
    run_watch = FullWatch(store, None)
    seen: list[StoreFull] = []
    store.on_full(seen.append)
    filler = _fill(small_tmpfs)
    app = make_app(on_small)
    stop = threading.Event()
    try:
        # `tokenmill run`'s loop returns (no traceback from its thread), and the command's watch raises
        Dispatcher(store, app, on_small).run(stop, job_id)
        with pytest.raises(StoreFull, match="disk is full at " + re.escape(str(small_tmpfs / "tm" / "tokenmill.db"))):
            run_watch.check()

        fleet = threading.Thread(target=Dispatcher(store, app, on_small).run, args=(stop,), daemon=True)
        fleet.start()
        wait_for(lambda: len(seen) >= 3, 30, "the scheduler to try again on the full store")
        assert fleet.is_alive()  # it waits for space instead of dying
        filler.unlink()

        def pending() -> int:
            with store.session() as s:
                return len(leases.pending_chunks(s, job_id, limit=10))

        assert pending() == 2
        wait_for(lambda: pending() == 0, 30, "the chunks sent once space was freed")
    finally:
        stop.set()
        store.dispose()

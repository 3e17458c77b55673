"""The store's disk fills: one clear line naming the path, exit 6, an intact database, and the same
command works once space is freed."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from tests.conftest import run_cli
from tokenmill.config import Settings


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

"""kill -9 an embedded `tokenmill serve` mid-batch, start it again: the batch completes, every row exactly once."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import API_KEYS, ServeProcess
from tests.server.helpers import CHAT, chat_line, client, jsonl, upload, wait_status
from tokenmill.store import Store
from tokenmill.store.tables import Result

pytestmark = [pytest.mark.model, pytest.mark.slow, pytest.mark.timeout(600)]


def test_kill_9_mid_batch_then_restart(tmp_path: Path, smollm2_path: Path, models_dir: Path) -> None:
    n = 24
    first = ServeProcess(tmp_path / ".tokenmill", models_dir).start()
    second: ServeProcess | None = None
    try:
        c = client(first.base_url, API_KEYS[0])
        lines = [chat_line(i, max_tokens=24) for i in range(n)]
        b = c.batches.create(input_file_id=upload(c, jsonl(lines)), endpoint=CHAT, completion_window="24h")
        deadline = time.monotonic() + 240
        while True:
            b = c.batches.retrieve(b.id)
            done = b.request_counts.completed if b.request_counts else 0
            if b.status == "in_progress" and done >= 2:
                break
            assert b.status in ("validating", "in_progress") and time.monotonic() < deadline, b
            time.sleep(0.3)
        assert done < n, "the batch finished before the crash; make it longer"
        first.kill9()
        second = ServeProcess(tmp_path / ".tokenmill", models_dir).start()
        c2 = client(second.base_url, API_KEYS[0])
        b = wait_status(c2, b.id, ("completed", "failed", "expired", "cancelled"), timeout=400)
        assert b.status == "completed" and b.request_counts is not None
        assert (b.request_counts.completed, b.request_counts.failed) == (n, 0)
        assert b.output_file_id is not None
        out = [json.loads(x) for x in c2.files.content(b.output_file_id).text.splitlines()]
        counts = Counter(line["custom_id"] for line in out)
        assert counts == Counter(f"req-{i}" for i in range(n))  # each row once, none missing
        store = Store(second.settings.database_url)
        with store.session() as s:
            assert s.query(Result).count() == n
        store.dispose()
    finally:
        first.stop()
        if second is not None:
            second.stop()

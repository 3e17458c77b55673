"""Fleet mode: two API-only `serve` replicas on Postgres + Redis beside `tokenmill scheduler` and a worker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import API_KEYS, STUB_ENV, WORKER_ENV, Procs, free_port, wait_http
from tests.server.helpers import CHAT, chat_line, client, jsonl, upload, wait_status
from tokenmill.config import Settings
from tokenmill.store import Store
from tokenmill.store.tables import Worker

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.model]


def test_two_replicas_share_one_store(tmp_path: Path, fleet_settings: Settings, procs: Procs) -> None:
    keys = {"TOKENMILL_API_KEYS": ",".join(API_KEYS)}
    ports = [free_port(), free_port()]
    for i, port in enumerate(ports):
        # the replicas queue jobs for the stub engine the fleet's worker runs (the engine is part of the queue)
        proc = procs.start(fleet_settings, "serve", "--port", str(port), env={**keys, **STUB_ENV}, name=f"serve{i}")
        wait_http(f"http://127.0.0.1:{port}/healthz", 60, proc)
    procs.start(fleet_settings, "scheduler", name="scheduler")
    procs.start(fleet_settings, "worker", "--name", "fleet-w", env={**STUB_ENV, **WORKER_ENV}, name="worker")
    one, two = (client(f"http://127.0.0.1:{p}/v1", API_KEYS[0]) for p in ports)
    fid = upload(one, jsonl([chat_line(i) for i in range(10)]))
    assert two.files.content(fid).content == jsonl([chat_line(i) for i in range(10)])  # any replica reads it
    b = two.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="24h")
    b = wait_status(one, b.id, ("completed", "failed", "expired", "cancelled"), timeout=120)
    assert b.status == "completed", (b, procs.logs())
    assert b.output_file_id is not None
    lines = [json.loads(x) for x in two.files.content(b.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == sorted(f"req-{i}" for i in range(10))
    store = Store(fleet_settings.database_url)
    with store.session() as s:
        assert [w.name for w in s.query(Worker).all()] == ["fleet-w"]  # API-only replicas start no workers
    store.dispose()

"""Embedded `serve` starts a model's local workers when a batch needs them and stops them once idle.

The engine is the test stub (real worker processes, real store and broker; no generation time), so this
is about the process life cycle, not the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.conftest import API_KEYS, STUB_ENV, ServeProcess
from tests.server.helpers import CHAT, chat_line, client, jsonl, upload, wait_status

pytestmark = pytest.mark.model  # the worker still resolves (and checks) the model file


def _workers(server: ServeProcess) -> list[psutil.Process]:
    assert server.proc is not None
    found = []
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        try:  # a worker that has just exited is a zombie until serve reaps it: gone, as far as work goes
            if p.status() != psutil.STATUS_ZOMBIE and "worker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_workers_start_on_demand_and_stop_when_idle(tmp_path: Path, smollm2_path: Path, models_dir: Path) -> None:
    server = ServeProcess(tmp_path / ".tokenmill", models_dir, env={**STUB_ENV, "TOKENMILL_STUB_DELAY": "0"})
    server.start(idle_stop=2.0)
    try:
        assert _workers(server) == []  # nothing to do: no model in memory
        c = client(server.base_url, API_KEYS[0])
        for round_ in range(2):
            fid = upload(c, jsonl([chat_line(i) for i in range(5)]))
            b = c.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="24h")
            b = wait_status(c, b.id, ("completed", "failed", "expired", "cancelled"), timeout=120)
            assert b.status == "completed" and b.request_counts and b.request_counts.completed == 5, (round_, b)
            _wait(lambda: _workers(server) == [], 60, "idle workers to stop")
    finally:
        server.stop()

"""Hostile batch files through a real embedded `serve` with the openai SDK: each ends failed, line by line.

A few seeded examples of tests/server/adversarial.py's generator (deep nesting, huge strings and numbers,
NUL, invalid UTF-8, giant schemas, grammar bombs), while a poller keeps asking for the batch. The timings
(time to failed, the poller's p99, the server's RSS) are benchmarks/adversarial_batches.py's to print.
"""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from openai import OpenAI

from tests.conftest import API_KEYS, ServeProcess
from tests.server.adversarial import HostileBatch, every_kind, hostile_batches, mismatches
from tests.server.helpers import CHAT, client, upload, wait_status

pytestmark = pytest.mark.model
FINAL = ("failed", "completed", "expired", "cancelled")


class Poller:
    """GET /v1/batches/{id} back to back from another thread: every answer must be a 200."""

    def __init__(self, base_url: str) -> None:
        self.c = client(base_url, API_KEYS[1])
        self.batch_id: str | None = None
        self.answers = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            batch_id = self.batch_id
            if batch_id is None:
                time.sleep(0.01)
                continue
            try:
                self.c.batches.retrieve(batch_id)
                self.answers += 1
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            time.sleep(0.02)


def fails_line_by_line(c: OpenAI, poller: Poller, batch: HostileBatch, timeout: float) -> None:
    b = c.batches.create(input_file_id=upload(c, batch.data), endpoint=CHAT, completion_window="24h")
    poller.batch_id = b.id
    b = wait_status(c, b.id, FINAL, timeout=timeout)
    assert b.status == "failed", (batch.describe(), b.status)
    errors = [e.model_dump() for e in (b.errors.data if b.errors else None) or []]
    assert not mismatches(batch, errors), (batch.describe(), mismatches(batch, errors))


@pytest.mark.timeout(240)
def test_every_hostile_batch_fails_with_its_poisoned_line_numbers(api_server: ServeProcess) -> None:
    c = client(api_server.base_url, API_KEYS[1])
    poller = Poller(api_server.base_url)
    poller.thread.start()

    @seed(20)
    @settings(
        max_examples=6,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(batch=hostile_batches(max_good=40, scale=200_000))
    def drawn(batch: HostileBatch) -> None:
        fails_line_by_line(c, poller, batch, timeout=60)

    try:
        drawn()
        fails_line_by_line(c, poller, every_kind(scale=1_000_000), timeout=60)  # each kind once, 12 MB
        fails_line_by_line(c, poller, every_kind(scale=10_000, good=3_570), timeout=120)  # 49,994 lines
    finally:
        poller.stop.set()
        poller.thread.join(timeout=10)
    assert poller.answers > 0 and not poller.errors, poller.errors[:3]

"""A worker's Prometheus endpoint agrees with what the store recorded for that worker.

Real `tokenmill worker --metrics-port` and `tokenmill scheduler` processes (stub engine) on Redis and
Postgres; the endpoint is scraped over HTTP and parsed with prometheus_client's own parser.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from tests.conftest import Procs
from tests.observability.helpers import free_port, http_get, start_stub_worker, submit, wait_job, write_prompts
from tokenmill.config import Settings
from tokenmill.store import Store
from tokenmill.store.tables import Result, Worker

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples | None:
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    if status != 200:
        return None
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.mark.timeout(240)
def test_metrics_endpoint_matches_the_store(tmp_path: Path, fleet_settings: Settings, procs: Procs) -> None:
    settings = fleet_settings
    port = free_port()
    start_stub_worker(procs, settings, "metricsw", "--metrics-port", str(port))

    deadline = time.monotonic() + 90
    samples = scrape(port)
    while samples is None and time.monotonic() < deadline:
        time.sleep(0.3)
        samples = scrape(port)
    assert samples is not None, procs.logs()
    # Before any work: the counters exist at zero, and the queue gauge is served (read from the store).
    assert value(samples, "tokenmill_tokens_predicted_total") == 0
    assert value(samples, "tokenmill_queue_depth") == 0

    # Submitted before the scheduler starts, so the worker's queue gauge must see the chunks waiting.
    too_long = {"id": "too-long", "prompt": "word " * 600, "max_tokens": 6}  # > the stub's 2048-char context
    data = write_prompts(tmp_path / "data.jsonl", 7, extra=[too_long])
    (job_id,) = submit(settings, data, "--chunk-size", "3")
    time.sleep(2.1)  # the gauge caches its store read for 2 s
    waiting = scrape(port)
    assert waiting is not None and value(waiting, "tokenmill_queue_depth") == 3  # 8 rows / 3 per chunk

    procs.start(settings, "scheduler", name="scheduler")
    store = Store(settings.database_url)
    try:
        assert wait_job(store, job_id, procs) == "completed_with_errors"
        # The same prompts again in a second job: deterministic rows come from the result cache.
        (cached_job,) = submit(settings, write_prompts(tmp_path / "again.jsonl", 2), "--chunk-size", "3")
        assert wait_job(store, cached_job, procs) == "completed"
        with store.session() as s:
            worker = s.scalars(select(Worker).where(Worker.name == "metricsw")).one()
            generated = s.execute(
                select(func.count(), func.sum(Result.completion_tokens), func.sum(Result.prompt_tokens)).where(
                    Result.worker_id == worker.id, Result.status == "succeeded", Result.cached.is_(False)
                )
            ).one()
            cached = s.scalar(select(func.count()).where(Result.worker_id == worker.id, Result.cached.is_(True)))
            tokens_recorded = worker.tokens_generated
    finally:
        store.dispose()
    rows, completion_tokens, prompt_tokens = generated
    assert (rows, cached) == (7, 2)

    time.sleep(2.1)
    after = scrape(port)
    assert after is not None
    assert value(after, "tokenmill_tokens_predicted_total") == tokens_recorded == completion_tokens > 0
    assert value(after, "tokenmill_prompt_tokens_total") == prompt_tokens > 0
    assert value(after, "tokenmill_requests_total", status="succeeded") == rows
    assert value(after, "tokenmill_requests_total", status="failed") == 1
    assert value(after, "tokenmill_request_failures_total", reason="RequestTooLong") == 1
    assert value(after, "tokenmill_cached_requests_total") == cached
    # Histograms: one observation per task that claimed work (the first job's three chunks run in one
    # task, which claims the next chunk as it drains; then the second job's), one TTFT per generated row.
    assert value(after, "tokenmill_chunk_duration_seconds_count") == 2
    # The stub takes no decode steps; the series exist (the real engine's are checked in tests/engines).
    series = ("decode_steps", "slot_steps", "filled_slot_steps")
    assert [value(after, f"tokenmill_{m}_total") for m in series] == [0, 0, 0]
    assert value(after, "tokenmill_chunk_duration_seconds_bucket", le="+Inf") == 2
    assert value(after, "tokenmill_time_to_first_token_seconds_count") == rows
    assert value(after, "tokenmill_chunk_duration_seconds_sum") > 0
    assert value(after, "tokenmill_predicted_tokens_seconds") >= 0
    assert value(after, "tokenmill_prompt_tokens_seconds") > 0
    assert value(after, "tokenmill_requests_processing") == 0
    assert value(after, "tokenmill_queue_depth") == 0

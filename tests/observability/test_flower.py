"""Flower, started the way the docs and docker-compose start it, sees tokenmill's workers and tasks.

Real processes: `tokenmill scheduler`, a `tokenmill worker` (stub engine: the model is not the point),
`celery --app tokenmill.celery_app:app flower`, all on the local Redis broker with a Postgres store.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Procs
from tests.observability.helpers import free_port, http_get, start_stub_worker, submit, wait_job, write_prompts
from tokenmill.celery_app import TASK_PROCESS_CHUNK
from tokenmill.config import Settings
from tokenmill.store import Store
from tokenmill.store import jobs as store_jobs

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


def start_flower(procs: Procs, settings: Settings, port: int) -> subprocess.Popen[bytes]:
    celery = Path(sys.executable).with_name("celery")
    argv = [str(celery), "--app", "tokenmill.celery_app:app", "flower", f"--port={port}", "--address=127.0.0.1"]
    # Only TOKENMILL_BROKER_URL: `celery --app` is an edge that reads the environment, nothing else.
    return procs.spawn(
        argv, {"TOKENMILL_BROKER_URL": settings.broker_url, "FLOWER_UNAUTHENTICATED_API": "true"}, "flower"
    )


def poll_json(url: str, ok: Any, timeout: float, procs: Procs) -> Any:
    """GET ``url`` until ``ok(json)`` is truthy; the last answer goes into the failure message."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        status, body = http_get(url)
        if status == 200:
            last = json.loads(body)
            if ok(last):
                return last
        time.sleep(0.5)
    raise AssertionError(f"{url} never satisfied the check; last answer: {last!r}\n{procs.logs()}")


@pytest.mark.timeout(240)
def test_flower_lists_the_worker_and_its_chunk_tasks(tmp_path: Path, fleet_settings: Settings, procs: Procs) -> None:
    settings = fleet_settings
    port = free_port()
    flower = start_flower(procs, settings, port)
    start_stub_worker(procs, settings, "flowerw")
    procs.start(settings, "scheduler", name="scheduler")
    base = f"http://127.0.0.1:{port}"

    def our_worker(workers: dict[str, Any]) -> str | None:
        return next((name for name in workers if name.startswith("flowerw-")), None)

    workers = poll_json(f"{base}/api/workers?refresh=1", lambda w: our_worker(w) is not None, 90, procs)
    hostname = our_worker(workers)
    assert hostname is not None and "@" in hostname  # "<name>-<pid>-<hex>@<host>", the worker id with ':' → '-'
    info = workers[hostname]
    queues = {q["name"] for q in info.get("active_queues", [])}
    assert "tm.smollm2-135m-instruct+stub" in queues, info.get("active_queues")  # the engine is in the queue
    assert TASK_PROCESS_CHUNK in info.get("registered", []), info.get("registered")
    assert info["stats"]["pool"]["max-concurrency"] == 1  # one task at a time: the model is not thread-safe

    store = Store(settings.database_url)
    try:
        (job_id,) = submit(settings, write_prompts(tmp_path / "data.jsonl", 6), "--chunk-size", "2")
        assert wait_job(store, job_id, procs) == "completed"
        with store.session() as s:
            n_chunks = store_jobs.get_job(s, job_id).n_chunks
    finally:
        store.dispose()
    assert n_chunks == 3

    def chunk_tasks(tasks: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            t for t in tasks.values()
            if t.get("name") == TASK_PROCESS_CHUNK and job_id in str(t.get("args")) and t.get("state") == "SUCCESS"
        ]  # fmt: skip

    tasks = poll_json(f"{base}/api/tasks", lambda t: len(chunk_tasks(t)) >= n_chunks, 60, procs)
    done = chunk_tasks(tasks)
    assert len(done) == n_chunks  # one message per chunk: nothing re-sent, nothing lost
    chunk_ids, served, generated = set(), 0, 0
    for t in done:
        assert t["worker"] == hostname
        args = ast.literal_eval(t["args"])
        assert args[0] == job_id
        chunk_ids.add(args[1])
        result = ast.literal_eval(t["result"])
        assert result["failed"] == 0
        if result["claimed"]:  # the task went on to the job's next chunks itself; their messages find them done
            served, generated = served + result["chunks"], generated + result["generated"]
        else:
            assert result["chunks"] == 0 and result["generated"] == 0
        assert t["received"] is not None and t["succeeded"] >= t["started"] >= t["received"]
    assert len(chunk_ids) == n_chunks and (served, generated) == (n_chunks, 6)
    assert flower.poll() is None, procs.logs()

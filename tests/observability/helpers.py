"""Small pieces the observability and everyday-use tests share: ports, datasets, HTTP, job waits."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import STUB_ARGS, STUB_ENV, WORKER_ENV, Procs, run_cli
from tokenmill.config import Settings
from tokenmill.store import Store
from tokenmill.store import jobs as store_jobs
from tokenmill.store.jobs import FINAL_STATES

STUB_WORKER_ENV = {**STUB_ENV, **WORKER_ENV}  # `run` with the stub backend: its local workers get --engine stub


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it, so parallel test runs do not collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_prompts(path: Path, n: int, *, max_tokens: int = 6, extra: list[dict[str, Any]] | None = None) -> Path:
    rows: list[dict[str, Any]] = [
        {"id": f"r{i}", "prompt": f"Count to {i}.", "max_tokens": max_tokens, "temperature": 0} for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + (extra or [])), encoding="utf-8")
    return path


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body); connection errors become status 0 so pollers can keep polling."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, b""


def submit(settings: Settings, path: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    """`tokenmill submit` for stub workers (the engine is part of a job's queue); returns the job ids printed."""
    proc = run_cli(settings, "submit", str(path), *args, timeout=120, env={**STUB_ENV, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def start_stub_worker(
    procs: Procs, settings: Settings, name: str, *args: str, env: dict[str, str] | None = None
) -> None:
    args = ("worker", *STUB_ARGS, "--name", name, "--threads", "1", *args)
    procs.start(settings, *args, env={**WORKER_ENV, **(env or {})}, name=name)


def wait_job(store: Store, job_id: str, procs: Procs, timeout: float = 120.0) -> str:
    """Block until the job reaches a final state; returns it (fails with the processes' logs)."""
    deadline = time.monotonic() + timeout
    state = "?"
    while time.monotonic() < deadline:
        with store.session() as s:
            state = store_jobs.get_job(s, job_id).state
        if state in FINAL_STATES:
            return state
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {state} after {timeout:.0f}s\n{procs.logs()}")

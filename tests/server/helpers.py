"""Batch input lines and small clients shared by the server tests."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Literal

from openai import OpenAI
from openai.types import Batch

MODEL = "smollm2-135m-instruct"
CHAT: Literal["/v1/chat/completions"] = "/v1/chat/completions"


def chat_line(i: int, *, max_tokens: int = 8, url: str = CHAT, model: str = MODEL) -> dict[str, Any]:
    return {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": url,
        "body": {
            "model": model,
            "messages": [{"role": "user", "content": f"Name a colour. ({i})"}],
            "max_tokens": max_tokens,
            "temperature": 0,
        },
    }


def jsonl(lines: Sequence[dict[str, Any] | str]) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


OPEN_CLIENTS: list[OpenAI] = []


def client(base_url: str, key: str) -> OpenAI:
    """An SDK client, closed after the test (tests/server/conftest.py): no sockets left to the GC."""
    c = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)
    OPEN_CLIENTS.append(c)
    return c


def close_clients() -> None:
    while OPEN_CLIENTS:
        OPEN_CLIENTS.pop().close()


def wait_status(c: OpenAI, batch_id: str, statuses: tuple[str, ...], timeout: float = 300) -> Batch:
    deadline = time.monotonic() + timeout
    b = c.batches.retrieve(batch_id)
    while b.status not in statuses:
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} still {b.status} after {timeout:.0f}s (wanted {statuses})")
        time.sleep(0.5)
        b = c.batches.retrieve(batch_id)
    return b


def upload(c: OpenAI, data: bytes, name: str = "in.jsonl") -> str:
    return c.files.create(file=(name, data), purpose="batch").id


def running_batch(server: Any, c: OpenAI, n: int, **create: Any) -> tuple[str, str]:
    """A batch of ``n`` chat lines created through the SDK and validated by one driver pass on an
    ``InProcessServer``: (batch id, job id), the job's rows stored and waiting."""
    from tokenmill.server.driver import BatchDriver
    from tokenmill.store.tables import ApiBatch

    fid = upload(c, jsonl([chat_line(i) for i in range(n)]))
    b = c.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="24h", **create)
    BatchDriver(server.store, server.settings).tick()
    with server.store.session() as s:
        job_id = s.get(ApiBatch, b.id).job_id
    assert job_id is not None, f"batch {b.id} did not start"
    return b.id, job_id


def answer_row(server: Any, job_id: str, seq: int) -> None:
    """Store a succeeded result for row ``seq``, as a worker would (control-plane tests: no model)."""
    from tokenmill.store.results import write_result

    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "blue"}}]}
    with server.store.session() as s:
        write_result(s, {"job_id": job_id, "seq": seq, "custom_id": f"req-{seq}", "status": "succeeded",
                         "body": body, "prompt_tokens": 5, "completion_tokens": 1})  # fmt: skip


def complete_job(server: Any, job_id: str) -> None:
    """Close the job's chunks and the job itself, as the last worker task would (its rows already answered)."""
    from sqlalchemy import update

    from tokenmill.store.jobs import finish_jobs
    from tokenmill.store.tables import Chunk

    with server.store.session() as s:
        s.execute(update(Chunk).where(Chunk.job_id == job_id).values(state="done"))
        assert finish_jobs(s, [job_id]) == [job_id]

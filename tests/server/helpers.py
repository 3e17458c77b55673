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

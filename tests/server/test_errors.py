"""Errors mapped once to OpenAI's shape and the right status: a store that is down is a 503 that names no
host, a reused Idempotency-Key with another body a 409, a malformed request a 400."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import uvicorn

from tests.conftest import ADMIN_KEY, API_KEYS, InProcessServer, free_port, wait_for
from tests.server.helpers import CHAT, chat_line, client, jsonl, upload
from tokenmill.config import Settings
from tokenmill.server.app import create_app
from tokenmill.store import Store

DEAD_URL = "postgresql://tmuser:tm-secret-pw@127.0.0.1:1/tmdatabase"  # nothing listens on port 1


def get(url: str, key: str | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def dead_store_server(settings: Settings) -> Iterator[str]:
    """The app over a store whose database refuses every connection (a real uvicorn, no migration)."""
    keyed = settings.with_(database_url=DEAD_URL, api_keys=API_KEYS, admin_keys=(ADMIN_KEY,))
    store = Store(DEAD_URL)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(keyed, store), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "uvicorn")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=15)
    store.dispose()


@pytest.mark.timeout(120)
def test_an_unreachable_store_is_a_503_that_names_nothing_of_it(dead_store_server: str) -> None:
    for path in ("/v1/files", "/v1/batches", "/v1/files/file-x", "/dashboard/api/jobs"):
        status, body = get(dead_store_server + path, API_KEYS[0])
        assert status == 503, (path, status, body)
        assert body["error"]["code"] == "service_unavailable" and body["error"]["type"] == "server_error"
        assert not [s for s in ("127.0.0.1", "tmuser", "tmdatabase", "tm-secret-pw") if s in json.dumps(body)]
    assert get(dead_store_server + "/healthz") == (503, {"status": "unavailable"})  # anyone: up or down only
    assert get(dead_store_server + "/healthz", API_KEYS[0]) == (503, {"status": "unavailable"})
    status, body = get(dead_store_server + "/healthz", ADMIN_KEY)  # the operator: where and why
    assert status == 503 and "tmdatabase" in body["reason"] and "tm-secret-pw" not in body["reason"]
    with pytest.raises(openai.InternalServerError) as raised:
        client(dead_store_server + "/v1", API_KEYS[0]).files.list()
    assert raised.value.status_code == 503


def test_an_idempotency_key_reused_with_another_body_is_a_409(api_app: InProcessServer) -> None:
    a, b = client(api_app.url + "/v1", API_KEYS[0]), client(api_app.url + "/v1", API_KEYS[1])
    fid = upload(a, jsonl([chat_line(0)]))
    key = {"Idempotency-Key": "nightly-2024-06-01"}
    first = a.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="24h", extra_headers=key)
    again = a.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="24h", extra_headers=key)
    assert again.id == first.id  # the same request retried: the same batch
    with pytest.raises(openai.ConflictError) as raised:
        a.batches.create(
            input_file_id=fid, endpoint=CHAT, completion_window="24h", metadata={"run": "2"}, extra_headers=key
        )
    error = raised.value.body
    assert isinstance(error, dict) and error["code"] == "idempotency_key_reused"
    assert [x.id for x in a.batches.list()] == [first.id]  # nothing was made by the refused request
    other = b.batches.create(input_file_id=upload(b, jsonl([chat_line(0)])), endpoint=CHAT,
                             completion_window="24h", extra_headers=key)  # fmt: skip
    assert other.id != first.id  # keys are per tenant

"""The official openai SDK against a real embedded `tokenmill serve` on the real model: what a user's script does."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import jsonschema
import openai
import pytest
from openai.types import Batch, FileObject
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from tests.conftest import ADMIN_KEY, API_KEYS, ServeProcess
from tests.server.helpers import CHAT, chat_line, client, jsonl, upload, wait_status
from tokenmill.store import Store
from tokenmill.store.tables import Job

pytestmark = pytest.mark.model
KEY_A, KEY_B, KEY_C = API_KEYS


def test_batch_runs_to_completed_and_every_line_parses(api_server: ServeProcess) -> None:
    c = client(api_server.base_url, KEY_A)
    n = 6
    data = jsonl([chat_line(i) for i in range(n)])
    f = c.files.create(file=("colours.jsonl", data), purpose="batch")
    assert isinstance(f, FileObject) and f.bytes == len(data) and f.purpose == "batch"
    b = c.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h", metadata={"run": "sdk"})
    assert isinstance(b, Batch) and b.status in ("validating", "in_progress")
    b = wait_status(c, b.id, ("completed", "failed", "expired", "cancelled"))
    assert b.status == "completed", b
    assert b.request_counts is not None
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (n, n, 0)
    assert b.created_at <= (b.in_progress_at or 0) <= (b.finalizing_at or 0) <= (b.completed_at or 0)
    assert b.expires_at == b.created_at + 24 * 3600
    assert b.model == "smollm2-135m-instruct" and b.metadata == {"run": "sdk"} and b.error_file_id is None
    assert b.usage is not None and b.usage.output_tokens > 0 and b.usage.total_tokens > b.usage.output_tokens
    assert b.output_file_id is not None
    out_file = c.files.retrieve(b.output_file_id)
    assert out_file.purpose == "batch_output" and out_file.filename.startswith(b.id)
    lines = [json.loads(x) for x in c.files.content(b.output_file_id).text.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"req-{i}" for i in range(n))
    for line in lines:
        assert line["error"] is None and line["response"]["status_code"] == 200
        completion = ChatCompletion.model_validate(line["response"]["body"])
        assert completion.choices[0].message.role == "assistant"
        assert completion.usage is not None and completion.usage.completion_tokens >= 1
    assert sum(json.loads(x)["response"]["body"]["usage"]["completion_tokens"] for x in map(json.dumps, lines)) == (
        b.usage.output_tokens
    )


def test_bad_file_fails_with_line_numbers_and_runs_nothing(api_server: ServeProcess) -> None:
    c = client(api_server.base_url, KEY_A)
    lines: list[dict[str, Any] | str] = [chat_line(1), "[1, 2]", chat_line(3, url="/v1/completions"), chat_line(4)]
    b = c.batches.create(input_file_id=upload(c, jsonl(lines)), endpoint=CHAT, completion_window="24h")
    b = wait_status(c, b.id, ("failed", "in_progress", "completed"), timeout=60)
    assert b.status == "failed" and b.errors is not None and b.errors.data
    assert [(e.line, e.param) for e in b.errors.data] == [(2, None), (3, "url")]
    assert "expected a JSON object" in (b.errors.data[0].message or "")
    assert b.output_file_id is None and b.request_counts is not None and b.request_counts.completed == 0
    store = Store(api_server.settings.database_url)
    with store.session() as s:
        assert not [j for j in s.query(Job).all() if b.id in j.name]
    store.dispose()


def test_cancel_a_running_batch(api_server: ServeProcess) -> None:
    c = client(api_server.base_url, KEY_A)
    b = c.batches.create(
        input_file_id=upload(c, jsonl([chat_line(i, max_tokens=48) for i in range(40)])),
        endpoint=CHAT,
        completion_window="24h",
    )
    wait_status(c, b.id, ("in_progress",), timeout=60)
    b = c.batches.cancel(b.id)
    assert b.status in ("cancelling", "cancelled")
    b = wait_status(c, b.id, ("cancelled",), timeout=120)
    assert b.cancelled_at is not None and b.request_counts is not None
    counts = b.request_counts
    assert counts.completed + counts.failed == counts.total == 40 and counts.completed < 40
    assert b.error_file_id is not None
    errors = [json.loads(x) for x in c.files.content(b.error_file_id).text.splitlines()]
    done = [json.loads(x) for x in c.files.content(b.output_file_id).text.splitlines()] if b.output_file_id else []
    assert len(errors) + len(done) == 40
    assert {e["custom_id"] for e in errors}.isdisjoint({d["custom_id"] for d in done})


def test_list_pagination(api_server: ServeProcess) -> None:
    c = client(api_server.base_url, KEY_C)
    fid = upload(c, jsonl([chat_line(0, url="/v1/completions")]))  # fails validation at once: no model work
    made = [c.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="24h").id for _ in range(5)]
    first = c.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more is True
    assert [b.id for b in c.batches.list(limit=100)] == made[::-1]
    assert [b.id for b in c.batches.list(limit=2)] == made[::-1]  # the SDK follows `after` across 3 pages
    last = c.batches.list(limit=2, after=made[1])
    assert [b.id for b in last.data] == [made[0]] and last.has_more is False


def test_auth_and_not_found(api_server: ServeProcess) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(api_server.base_url, "sk-not-a-key").batches.list()
    c = client(api_server.base_url, KEY_A)
    with pytest.raises(openai.NotFoundError):
        c.batches.retrieve("batch_does_not_exist")
    with pytest.raises(openai.NotFoundError):
        c.files.content("file-does-not-exist")
    with pytest.raises(openai.NotFoundError):
        c.batches.create(input_file_id="file-does-not-exist", endpoint=CHAT, completion_window="24h")


def test_tenants_see_only_their_own(api_server: ServeProcess) -> None:
    a, b = client(api_server.base_url, KEY_A), client(api_server.base_url, KEY_B)
    fid = upload(a, jsonl([chat_line(0, url="/v1/completions")]))
    batch = a.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="24h")
    for call in (
        lambda: b.files.retrieve(fid),
        lambda: b.files.content(fid),
        lambda: b.files.delete(fid),
        lambda: b.batches.retrieve(batch.id),
        lambda: b.batches.cancel(batch.id),
        lambda: b.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="24h"),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert fid not in {f.id for f in b.files.list()}
    assert batch.id not in {x.id for x in b.batches.list()}
    assert a.files.retrieve(fid).id == fid


def test_health_metrics_and_no_keys_in_the_log(api_server: ServeProcess) -> None:
    base = api_server.base_url.removesuffix("/v1")
    with urllib.request.urlopen(base + "/healthz", timeout=10) as resp:
        assert json.loads(resp.read()) == {"status": "ok"}
    scrape = urllib.request.Request(base + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    with urllib.request.urlopen(scrape, timeout=10) as resp:
        text = resp.read().decode()
    assert 'tokenmill_batches{status="completed"}' in text and "tokenmill_http_requests_total" in text
    assert 'route="/v1/batches/{batch_id}"' in text
    logs = api_server.log.read_text(errors="replace") + "".join(
        p.read_text(errors="replace") for p in (api_server.data_dir / "logs").glob("*.log")
    )
    assert all(key not in logs for key in (*API_KEYS, ADMIN_KEY))


def test_a_responses_batch_through_the_sdk(api_server: ServeProcess) -> None:
    """``batches.create(endpoint="/v1/responses")``: every output body is a ``Response``, and the batch's usage
    sums their Responses-shaped usage."""
    pick = {"type": "object", "properties": {"colour": {"enum": ["red", "blue"]}}, "required": ["colour"],
            "additionalProperties": False}  # fmt: skip
    add = {"type": "function", "name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "maximum": 99}, "b": {"type": "integer", "maximum": 99}}, "required": ["a", "b"],
        "additionalProperties": False}}  # fmt: skip
    bodies: dict[str, dict[str, Any]] = {
        "text": {"input": "Name a colour.", "max_output_tokens": 6, "metadata": {"k": "v"}},
        "json": {"input": "Pick a colour as JSON.", "max_output_tokens": 24,
                 "text": {"format": {"type": "json_schema", "name": "pick", "schema": pick, "strict": True}}},
        "call": {"input": "What is 2 plus 3?", "tools": [add], "tool_choice": {"type": "function", "name": "add"},
                 "parallel_tool_calls": False, "max_output_tokens": 40},
    }  # fmt: skip
    lines = [
        {"custom_id": cid, "method": "POST", "url": "/v1/responses",
         "body": {"model": "smollm2-135m-instruct", "temperature": 0, **body}}
        for cid, body in bodies.items()
    ]  # fmt: skip
    c = client(api_server.base_url, KEY_A)
    b = c.batches.create(input_file_id=upload(c, jsonl(lines)), endpoint="/v1/responses", completion_window="24h")
    assert b.endpoint == "/v1/responses"
    b = wait_status(c, b.id, ("completed", "failed", "expired", "cancelled"))
    assert b.status == "completed" and b.output_file_id is not None and b.error_file_id is None, b
    out = {x["custom_id"]: x for x in map(json.loads, c.files.content(b.output_file_id).text.splitlines())}
    responses = {cid: Response.model_validate(line["response"]["body"]) for cid, line in out.items()}
    assert set(responses) == set(bodies) and all(x["error"] is None for x in out.values())
    assert responses["text"].metadata == {"k": "v"} and responses["text"].output_text
    if responses["json"].status == "completed":
        jsonschema.validate(json.loads(responses["json"].output_text), pick)
    (call,) = responses["call"].output
    assert call.type == "function_call" and call.name == "add"
    jsonschema.validate(json.loads(call.arguments), add["parameters"])
    usages = [r.usage for r in responses.values()]
    assert b.usage is not None and all(u is not None for u in usages)
    assert b.usage.input_tokens == sum(u.input_tokens for u in usages if u)
    assert b.usage.output_tokens == sum(u.output_tokens for u in usages if u)
    assert b.usage.total_tokens == b.usage.input_tokens + b.usage.output_tokens

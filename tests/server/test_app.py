"""The API over real HTTP (uvicorn in a thread, real SQLite), with the batch driver stepped by hand: no model."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from typing import Any

import openai
import pytest

from tests.conftest import API_KEYS, InProcessServer, run_cli
from tests.server.helpers import CHAT, chat_line, client, jsonl, upload
from tokenmill.errors import ConfigError
from tokenmill.server.auth import check_bind, match_key
from tokenmill.server.driver import BatchDriver
from tokenmill.store.results import write_result
from tokenmill.store.tables import ApiFileChunk, Job

KEY_A, KEY_B = API_KEYS[0], API_KEYS[1]


def raw(server: InProcessServer, method: str, path: str, body: bytes | None = None, **headers: Any) -> tuple[int, Any]:
    req = urllib.request.Request(server.url + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def multipart(data: bytes, purpose: str = "batch") -> tuple[bytes, str]:
    boundary = "tmboundary1234"
    parts = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return parts + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_file_round_trip_is_byte_exact_across_chunks(api_app: InProcessServer) -> None:
    c = client(api_app.url + "/v1", KEY_A)
    data = b"".join(b'{"n": %d, "pad": "%s"}\n' % (i, b"x" * 3000) for i in range(800))  # ~2.4 MB: 3 chunks
    f = c.files.create(file=("big.jsonl", data), purpose="batch")
    assert (f.bytes, f.filename, f.purpose, f.status, f.object) == (
        len(data),
        "big.jsonl",
        "batch",
        "processed",
        "file",
    )
    assert c.files.content(f.id).content == data
    with api_app.store.session() as s:
        assert s.query(ApiFileChunk).filter_by(file_id=f.id).count() == 3
    assert c.files.retrieve(f.id).id == f.id
    assert f.id in [x.id for x in c.files.list()]
    assert c.files.delete(f.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)


def test_upload_caps_and_purpose(api_app: InProcessServer) -> None:
    too_big, ctype = multipart(b"x" * (3 * 2**20 + 10))
    status, body = raw(
        api_app, "POST", "/v1/files", too_big, **{"Content-Type": ctype, "Authorization": f"Bearer {KEY_A}"}
    )
    assert status == 413 and body["error"]["code"] == "file_too_large" and body["error"]["param"] == "file"
    # Refused from its Content-Length alone: the answer comes before a byte of the body is sent.
    conn = http.client.HTTPConnection("127.0.0.1", api_app.port, timeout=30)
    conn.putrequest("POST", "/v1/files")
    for name, value in (
        ("Content-Type", ctype),
        ("Content-Length", str(50 * 2**20)),
        ("Authorization", f"Bearer {KEY_A}"),
    ):
        conn.putheader(name, value)
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "file_too_large"
    conn.close()
    c = client(api_app.url + "/v1", KEY_A)
    with pytest.raises(openai.BadRequestError, match="more than 1000 lines"):
        c.files.create(file=("many.jsonl", b"{}\n" * 1001), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        c.files.create(file=("a.jsonl", b"{}\n"), purpose="fine-tune")
    assert c.files.list().data == []  # nothing half-stored by the refused uploads


def test_errors_have_openai_shape(api_app: InProcessServer) -> None:
    status, body = raw(api_app, "GET", "/v1/batches")
    assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "authentication_error"
    status, body = raw(api_app, "GET", "/v1/batches", Authorization="Bearer sk-wrong")
    assert status == 401
    auth = {"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"}
    status, body = raw(api_app, "GET", "/v1/batches/batch_nope", None, **auth)
    assert status == 404 and "batch_nope" in body["error"]["message"]
    meta = {f"k{i}": "v" for i in range(17)}
    spec = {"input_file_id": "file-x", "endpoint": CHAT, "completion_window": "24h", "metadata": meta}
    status, body = raw(api_app, "POST", "/v1/batches", json.dumps(spec).encode(), **auth)
    assert status == 400 and body["error"]["param"] == "metadata"
    spec = {"input_file_id": "file-x", "endpoint": "/v1/moderations", "completion_window": "24h"}
    status, body = raw(api_app, "POST", "/v1/batches", json.dumps(spec).encode(), **auth)
    assert status == 400 and body["error"]["param"] == "endpoint"
    status, body = raw(api_app, "GET", "/v1/batches?limit=101", None, **auth)
    assert status == 400 and body["error"]["param"] == "limit"
    status, body = raw(api_app, "POST", "/v1/batches", b"{not json", **auth)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"


def test_bad_lines_fail_the_batch_with_line_numbers_and_store_nothing(api_app: InProcessServer) -> None:
    c = client(api_app.url + "/v1", KEY_A)
    lines: list[dict[str, Any] | str] = [
        chat_line(1),
        "{not json",
        chat_line(3, url="/v1/completions"),
        {"custom_id": "req-4", "method": "POST", "url": CHAT, "body": {"model": "smollm2-135m-instruct"}},
        chat_line(5, model="gpt-4o-mini-unknown"),
        chat_line(6),
    ]
    b = c.batches.create(input_file_id=upload(c, jsonl(lines)), endpoint=CHAT, completion_window="24h")
    assert b.status == "validating"
    BatchDriver(api_app.store, api_app.settings).tick()
    b = c.batches.retrieve(b.id)
    assert b.status == "failed" and b.failed_at is not None and b.errors is not None
    by_line = {e.line or 0: e for e in b.errors.data or []}
    assert sorted(by_line) == [2, 3, 4, 5]
    assert "invalid JSON" in (by_line[2].message or "")
    assert by_line[3].param == "url" and "/v1/completions" in (by_line[3].message or "")
    assert by_line[4].param == "body.messages"
    assert by_line[5].param == "body.model" and by_line[5].code == "mismatched_model"
    with api_app.store.session() as s:
        assert s.query(Job).count() == 0


def test_unknown_model_is_refused_per_line_and_embeddings_are_accepted(api_app: InProcessServer) -> None:
    c = client(api_app.url + "/v1", KEY_A)
    bad_model = c.batches.create(
        input_file_id=upload(c, jsonl([chat_line(1, model="no-such-model")])), endpoint=CHAT, completion_window="24h"
    )
    emb = {"custom_id": "e1", "method": "POST", "url": "/v1/embeddings", "body": {"model": "smollm2", "input": "hi"}}
    embeddings = c.batches.create(
        input_file_id=upload(c, jsonl([emb])), endpoint="/v1/embeddings", completion_window="24h"
    )
    BatchDriver(api_app.store, api_app.settings).tick()
    b1, b2 = c.batches.retrieve(bad_model.id), c.batches.retrieve(embeddings.id)
    assert b1.status == "failed"
    assert b1.errors and b1.errors.data and b1.errors.data[0].code == "model_not_found" and b1.errors.data[0].line == 1
    assert b2.status == "in_progress" and b2.endpoint == "/v1/embeddings"  # decoder models embed too (mean pooling)
    assert b2.request_counts is not None and b2.request_counts.total == 1 and not b2.errors


def _start(server: InProcessServer, n: int) -> tuple[openai.OpenAI, str, str]:
    c = client(server.url + "/v1", KEY_A)
    b = c.batches.create(input_file_id=upload(c, jsonl([chat_line(i) for i in range(n)])), endpoint=CHAT,
                         completion_window="24h", metadata={"team": "a"})  # fmt: skip
    BatchDriver(server.store, server.settings).tick()
    b = c.batches.retrieve(b.id)
    assert b.status == "in_progress" and b.model == "smollm2-135m-instruct" and b.metadata == {"team": "a"}
    assert b.request_counts is not None and b.request_counts.total == n
    assert b.job_id if hasattr(b, "job_id") else True
    with server.store.session() as s:
        job = s.query(Job).one()
        return c, b.id, job.id


def _succeed(server: InProcessServer, job_id: str, seq: int) -> None:
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "blue"}}]}
    with server.store.session() as s:
        write_result(s, {"job_id": job_id, "seq": seq, "custom_id": f"req-{seq}", "status": "succeeded", "body": body,
                         "prompt_tokens": 5, "completion_tokens": 1})  # fmt: skip


def test_expired_batch_keeps_finished_rows_and_reports_the_rest(settings: Any) -> None:
    with InProcessServer(settings.with_(api_keys=API_KEYS, batch_window_seconds=1.0)) as server:
        c, batch_id, job_id = _start(server, 3)
        _succeed(server, job_id, 1)
        time.sleep(1.1)
        BatchDriver(server.store, server.settings).tick()
        b = c.batches.retrieve(batch_id)
        assert b.status == "expired" and b.expired_at is not None and b.finalizing_at is not None
        assert b.request_counts is not None and (b.request_counts.completed, b.request_counts.failed) == (1, 2)
        assert b.output_file_id and b.error_file_id
        out = [json.loads(x) for x in c.files.content(b.output_file_id).text.splitlines()]
        err = [json.loads(x) for x in c.files.content(b.error_file_id).text.splitlines()]
        assert [o["custom_id"] for o in out] == ["req-1"]
        assert [(e["custom_id"], e["error"]["code"]) for e in err] == [
            ("req-0", "batch_expired"),
            ("req-2", "batch_expired"),
        ]
        assert c.files.retrieve(b.output_file_id).purpose == "batch_output"
        with server.store.session() as s:
            assert s.get(Job, job_id).state == "cancelled"  # type: ignore[union-attr]


def test_cancel_in_progress_then_idempotency(api_app: InProcessServer) -> None:
    c, batch_id, job_id = _start(api_app, 3)
    _succeed(api_app, job_id, 0)
    b = c.batches.cancel(batch_id)
    assert b.status == "cancelling" and b.cancelling_at is not None
    BatchDriver(api_app.store, api_app.settings).tick()
    b = c.batches.retrieve(batch_id)
    assert b.status == "cancelled" and b.cancelled_at is not None
    assert b.request_counts is not None and (b.request_counts.completed, b.request_counts.failed) == (1, 2)
    assert b.error_file_id is not None
    codes = {json.loads(x)["error"]["code"] for x in c.files.content(b.error_file_id).text.splitlines()}
    assert codes == {"batch_cancelled"}
    with pytest.raises(openai.BadRequestError, match="already cancelled"):
        c.batches.cancel(batch_id)
    fid = upload(c, jsonl([chat_line(0)]))
    first = c.batches.create(
        input_file_id=fid, endpoint=CHAT, completion_window="24h", extra_headers={"Idempotency-Key": "k1"}
    )
    again = c.batches.create(
        input_file_id=fid, endpoint=CHAT, completion_window="24h", extra_headers={"Idempotency-Key": "k1"}
    )
    other = c.batches.create(
        input_file_id=fid, endpoint=CHAT, completion_window="24h", extra_headers={"Idempotency-Key": "k2"}
    )
    assert first.id == again.id != other.id
    same_key_b = client(api_app.url + "/v1", KEY_B)  # another tenant's key space is its own
    with pytest.raises(openai.NotFoundError):
        same_key_b.batches.create(
            input_file_id=fid, endpoint=CHAT, completion_window="24h", extra_headers={"Idempotency-Key": "k1"}
        )
    cancelled_early = c.batches.cancel(other.id)  # still validating: cancelled at once, nothing stored
    assert cancelled_early.status == "cancelled"


def test_keys_compare_and_bind_rules() -> None:
    assert match_key("sk-b", ("sk-a", "sk-b")) == "sk-b"
    assert match_key("sk-", ("sk-a", "sk-b")) is None
    check_bind("127.0.0.1", ())
    check_bind("::1", ())
    check_bind("0.0.0.0", ("k",))
    with pytest.raises(ConfigError, match=r"refusing to listen on 0\.0\.0\.0 without API keys"):
        check_bind("0.0.0.0", ())


def test_serve_refuses_a_network_bind_without_keys(settings: Any) -> None:
    proc = run_cli(settings, "serve", "--host", "0.0.0.0", "--port", "1", timeout=60, env={"TOKENMILL_API_KEYS": ""})
    assert proc.returncode == 2, proc.stderr
    assert "refusing to listen on 0.0.0.0 without API keys" in proc.stderr and "Traceback" not in proc.stderr


def test_a_binary_or_blank_file_fails_as_a_whole(api_app: InProcessServer) -> None:
    c = client(api_app.url + "/v1", KEY_A)
    gz = c.batches.create(input_file_id=upload(c, b"\x1f\x8b\x08\x00rest"), endpoint=CHAT, completion_window="24h")
    blank = c.batches.create(input_file_id=upload(c, b"\n\n  \n"), endpoint=CHAT, completion_window="24h")
    BatchDriver(api_app.store, api_app.settings).tick()
    for batch_id, words in ((gz.id, "gzip"), (blank.id, "no rows")):
        b = c.batches.retrieve(batch_id)
        assert b.status == "failed" and b.errors and b.errors.data, b
        assert b.errors.data[0].line is None and words in (b.errors.data[0].message or ""), b.errors

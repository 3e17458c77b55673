"""Who sees what, tried from outside: the real `tokenmill serve` (the real model) with the official SDK and raw
HTTP as four callers (no key, tenant A, tenant B, the operator) over every route the app has, so a route
added later is swept too. And the door itself: a key is checked before any body byte is read, and every
body is capped as it streams, chunked or not.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import select
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest
import requests
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tests.conftest import ADMIN_KEY, API_KEYS, InProcessServer, ServeProcess
from tests.server.helpers import CHAT, MODEL, client, jsonl, upload, wait_status
from tokenmill.config import Settings
from tokenmill.server import dashboard
from tokenmill.server.app import create_app
from tokenmill.server.gate import JSON_MAX_BYTES, OPEN_PATHS

KEY_A, KEY_B = API_KEYS[0], API_KEYS[1]
BOUNDARY = "tmsecurity"


def line(custom_id: str, content: str) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0}
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}


def run_batch(c: openai.OpenAI, rows: list[dict[str, Any]]) -> tuple[str, str, list[dict[str, Any]]]:
    """(batch id, input file id, output lines) of a batch run to completion."""
    fid = upload(c, jsonl(rows))
    b = wait_status(c, c.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="24h").id,
                    ("completed", "failed", "expired", "cancelled"), timeout=240)  # fmt: skip
    assert b.status == "completed" and b.output_file_id, b
    return b.id, fid, [json.loads(x) for x in c.files.content(b.output_file_id).text.splitlines()]


def job_of(output_line: dict[str, Any]) -> str:
    """The job behind an output line: its id is ``batch_req_<job>_<seq>``."""
    return str(output_line["id"]).removeprefix("batch_req_").rsplit("_", 1)[0]


@dataclass
class Tenant:
    key: str
    files: list[str] = field(default_factory=list)
    batches: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)
    marks: list[str] = field(default_factory=list)  # custom ids and prompts only this tenant sent

    def secrets(self) -> list[str]:
        return [*self.files, *self.batches, *self.jobs, *self.marks]


@dataclass
class World:
    a: Tenant
    b: Tenant
    outputs: dict[str, list[dict[str, Any]]]


@pytest.fixture(scope="module")
def world(api_server: ServeProcess) -> Iterator[World]:
    """A and B each send the same temperature-0 line (the cache must not cross), A sends it again (the cache
    must serve A), and A keeps a private file nobody else may read."""
    tag = uuid.uuid4().hex[:8]
    shared = f"Name one colour, {tag}."
    a, b = Tenant(KEY_A), Tenant(KEY_B)
    ca, cb = client(api_server.base_url, KEY_A), client(api_server.base_url, KEY_B)
    outputs = {}
    for name, tenant, c in (("a1", a, ca), ("b1", b, cb), ("a2", a, ca)):
        custom = f"{name}-secret-{tag}"
        batch_id, fid, out = run_batch(c, [line(custom, shared)])
        tenant.batches.append(batch_id)
        tenant.files.append(fid)
        tenant.jobs.append(job_of(out[0]))
        tenant.marks.append(custom)
        outputs[name] = out
    private = f"alpha-private-{tag}"
    a.files.insert(0, upload(ca, jsonl([line(f"a-private-{tag}", private)])))
    a.marks.append(private)
    yield World(a, b, outputs)


def test_the_result_cache_never_crosses_tenants(world: World) -> None:
    (a1,), (b1,), (a2,) = world.outputs["a1"], world.outputs["b1"], world.outputs["a2"]
    job_a1, job_b1, job_a2 = world.a.jobs[0], world.b.jobs[0], world.a.jobs[1]
    assert a1["tokenmill"]["cached"] is False
    assert b1["tokenmill"]["cached"] is False, b1  # B's identical line was generated, not copied from A
    assert "cached_from" not in b1["tokenmill"]["timings"] and job_a1 not in json.dumps(b1)
    assert b1["response"]["body"]["id"] == f"chatcmpl-{job_b1}-0"
    # The same tenant's repeat is served from its own answer, under its own ids.
    assert a2["tokenmill"]["cached"] is True and a2["tokenmill"]["timings"]["cached_from"] == job_a1
    assert a2["response"]["body"]["id"] == f"chatcmpl-{job_a2}-0" and a2["id"] == f"batch_req_{job_a2}_0"
    assert a2["response"]["body"]["choices"] == a1["response"]["body"]["choices"]


def all_routes() -> list[tuple[str, str]]:
    """(method, path) of every route: the OpenAPI document's (a new API route is swept once it is there),
    the dashboard's (not documented: for people) and FastAPI's own (the docs pages)."""
    app = create_app(Settings(database_url="sqlite:///:memory:"))
    documented = {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    pages = {
        (m, r.path)
        for r in [*app.routes, *dashboard.router.routes]
        if isinstance(r, Route)
        for m in (r.methods or ())
        if m != "HEAD"
    }
    assert {"/v1/files", "/v1/batches/{batch_id}/cancel", "/metrics"} <= {p for _, p in documented}
    assert {"/", "/dashboard/api/jobs", "/dashboard/jobs/{job_id}/results.jsonl", "/docs"} <= {p for _, p in pages}
    return sorted(documented | pages)


ROUTES = all_routes()


def request(web: Web, method: str, path: str, auth: str | None, ids: dict[str, str]) -> requests.Response:
    """``path`` with ``ids`` put in; a body where the route takes one (A's private file is what a create names)."""
    names = re.findall(r"{(\w+)}", path)
    assert set(names) <= set(ids), f"{path}: add its path parameter to the sweep"
    url = path.format(**ids)
    headers = {"Authorization": auth} if auth else {}
    if (method, path) == ("POST", "/v1/files"):
        return web.request(
            "POST", url, headers=headers, files={"file": ("x.jsonl", b"{}\n")}, data={"purpose": "batch"}
        )
    if method in ("POST", "PUT", "PATCH"):
        spec = {"input_file_id": ids["file_id"], "endpoint": CHAT, "completion_window": "24h"}
        return web.request(method, url, headers=headers, json=spec)
    return web.request(method, url, headers=headers)


class Web:
    """Raw HTTP against one server (``requests``): paths, not URLs, and a timeout on every call."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.session = requests.Session()

    def __enter__(self) -> Web:
        return self

    def __exit__(self, *exc: object) -> None:
        self.session.close()

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.session.request(method, self.base + path, timeout=60, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)


def bearer(key: str) -> str:
    return f"Bearer {key}"


def test_no_caller_gets_another_tenants_data_on_any_route(api_server: ServeProcess, world: World) -> None:
    a, b = world.a, world.b
    ids = {"file_id": a.files[0], "batch_id": a.batches[0], "job_id": a.jobs[0]}
    base = api_server.base_url.removesuffix("/v1")
    with Web(base) as web:
        for method, path in ROUTES:
            for auth in (None, "Bearer sk-not-a-key", "Basic " + base64.b64encode(b"x:sk-wrong").decode()):
                r = request(web, method, path, auth, ids)
                leaked = [s for s in a.secrets() + b.secrets() if s in r.text]
                assert not leaked, (method, path, auth, r.status_code, leaked)
                if path in OPEN_PATHS:
                    assert r.status_code < 400 and (path != "/healthz" or r.json() == {"status": "ok"})
                else:
                    assert r.status_code == 401, (method, path, auth, r.status_code)
                    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            r = request(web, method, path, bearer(KEY_B), ids)
            named = "{" in path or (method != "GET" and path != "/v1/files")  # the request names A's ids
            leaked = [s for s in a.secrets() if s in r.text and not (named and s in ids.values())]  # not echoes
            assert not leaked, (method, path, r.status_code, leaked)
            if named:
                assert r.status_code == 404, (method, path, r.status_code)
            if path == "/metrics":
                assert r.status_code == 403
            if method != "GET":
                continue  # A and the operator only read: A's data stays as it was for the checks below
            r = request(web, method, path, bearer(KEY_A), ids)
            assert r.status_code == (403 if path == "/metrics" else 200), (method, path, r.status_code, r.text[:200])
            assert not [s for s in b.secrets() if s in r.text], (method, path)
            r = request(web, method, path, bearer(ADMIN_KEY), ids)
            operator_sees = path.startswith("/dashboard") or "{" not in path
            assert r.status_code == (200 if operator_sees else 404), (method, path, r.status_code)
        mine = web.get("/dashboard/api/jobs", headers={"Authorization": bearer(KEY_A)}).json()["jobs"]
        everyone = web.get("/dashboard/api/jobs", headers={"Authorization": bearer(ADMIN_KEY)}).json()["jobs"]
        workers = web.get("/dashboard/api/workers", headers={"Authorization": bearer(KEY_A)}).json()["workers"]
        refused = web.get("/", headers={})
    assert {j["id"] for j in mine} >= set(a.jobs) and not {j["id"] for j in mine} & set(b.jobs)
    assert {j["id"] for j in everyone} >= set(a.jobs) | set(b.jobs)
    assert workers == []  # hosts and other tenants' current jobs are the operator's to see
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic ")
    sdk_a = client(api_server.base_url, KEY_A)
    assert sdk_a.files.retrieve(a.files[0]).id == a.files[0]  # B's delete and cancel changed nothing
    assert sdk_a.batches.retrieve(a.batches[0]).status == "completed"


def test_the_sdk_as_each_caller(api_server: ServeProcess, world: World) -> None:
    a, b = world.a, world.b
    sdk_b = client(api_server.base_url, KEY_B)
    for call in (lambda: sdk_b.files.content(a.files[0]), lambda: sdk_b.batches.retrieve(a.batches[0])):
        with pytest.raises(openai.NotFoundError):
            call()
    assert not {f.id for f in sdk_b.files.list()} & set(a.files)
    assert not {x.id for x in sdk_b.batches.list()} & set(a.batches)
    for key in ("sk-nobody", ADMIN_KEY + "x"):
        with pytest.raises(openai.AuthenticationError):
            client(api_server.base_url, key).files.list()
    operator = client(api_server.base_url, ADMIN_KEY)  # the operator's own files: none of the tenants'
    assert not {f.id for f in operator.files.list()} & set(a.files + b.files)


def multipart_head() -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


def send_chunked(
    port: int, path: str, headers: dict[str, str], total: int, first: bytes = b"", chunk: int = 64 * 1024
) -> tuple[int | None, int, dict[str, Any] | None]:
    """POST up to ``total`` body bytes with ``Transfer-Encoding: chunked`` (no Content-Length), stopping as soon
    as the server answers or shuts the door; (status, body bytes sent, the answer's JSON)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock.sendall(head.encode())
    sent = 0
    piece = b"%x\r\n" % chunk + b"x" * chunk + b"\r\n"
    try:
        if first:
            sock.sendall(b"%x\r\n" % len(first) + first + b"\r\n")
            sent += len(first)
        while sent < total and not select.select([sock], [], [], 0)[0]:
            sock.sendall(piece)
            sent += chunk
    except OSError:  # the server closed the connection (or stopped reading): it takes no more
        pass
    answer = b""
    try:
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            got = sock.recv(65536)
            if not got:
                break
            answer += got
    except OSError:
        pass
    sock.close()
    if not answer.startswith(b"HTTP/1.1 "):
        return None, sent, None
    status = int(answer.split(b" ", 2)[1])
    payload = answer.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in answer else b""
    return status, sent, json.loads(payload) if payload else None


def _length(answer: bytes) -> int:
    found = re.search(rb"(?i)content-length: *(\d+)", answer)
    return int(found.group(1)) if found else 0


def test_a_chunked_upload_without_a_key_is_refused_unread_by_the_real_server(api_server: ServeProcess) -> None:
    total = 64 * 2**20
    status, sent, body = send_chunked(
        api_server.port, "/v1/files", {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}, total,
        first=multipart_head(),
    )  # fmt: skip
    assert status == 401 and body is not None and body["error"]["code"] == "invalid_api_key"
    assert sent < total // 4, f"the client pushed {sent} bytes before the server said no"


class BodyProbe:
    """An ASGI wrapper between uvicorn and the app: counts the body bytes the app pulls through ``receive``."""

    def __init__(self) -> None:
        self.read = 0

    def wrap(self, app: ASGIApp) -> ASGIApp:
        async def probed(scope: Scope, receive: Receive, send: Send) -> None:
            async def counted() -> Message:
                message = await receive()
                if message["type"] == "http.request":
                    self.read += len(message.get("body", b""))
                return message

            await app(scope, counted, send)

        return probed


@pytest.fixture
def probed(settings: Settings) -> Iterator[tuple[InProcessServer, BodyProbe]]:
    probe = BodyProbe()
    keyed = settings.with_(api_keys=API_KEYS, admin_keys=(ADMIN_KEY,), file_max_bytes=2**20)
    with InProcessServer(keyed, wrap=probe.wrap) as server:
        yield server, probe


@pytest.mark.timeout(120)
def test_no_body_byte_is_read_before_the_key_and_every_body_is_capped_as_it_streams(
    probed: tuple[InProcessServer, BodyProbe],
) -> None:
    server, probe = probed
    multipart = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    status, _, body = send_chunked(server.port, "/v1/files", multipart, 32 * 2**20, first=multipart_head())
    assert status == 401 and body is not None and body["error"]["type"] == "authentication_error"
    assert probe.read == 0  # the app never asked for a byte of it

    keyed = {**multipart, "Authorization": bearer(KEY_A)}
    status, _, body = send_chunked(server.port, "/v1/files", keyed, 32 * 2**20, first=multipart_head())
    assert status == 413 and body is not None and body["error"]["code"] == "file_too_large"
    slack = 512 * 1024  # what uvicorn hands over in one message: it coalesces what the socket had
    assert 2**20 < probe.read <= 2**20 + 64 * 1024 + slack  # the cap, the form's overhead: not 32 MiB

    probe.read = 0
    json_headers = {"Content-Type": "application/json", "Authorization": bearer(KEY_A)}
    status, _, body = send_chunked(server.port, "/v1/batches", json_headers, 16 * 2**20, first=b'{"metadata": "')
    assert status == 413 and body is not None and body["error"]["code"] == "request_too_large"
    assert JSON_MAX_BYTES < probe.read <= JSON_MAX_BYTES + slack

    probe.read = 0
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/batches")
    for name, value in {**json_headers, "Content-Length": str(JSON_MAX_BYTES + 1)}.items():
        conn.putheader(name, value)
    conn.endheaders()  # and not a byte of the body: its Content-Length alone is refused
    declared = conn.getresponse()
    assert declared.status == 413 and json.loads(declared.read())["error"]["code"] == "request_too_large"
    conn.close()
    assert probe.read == 0
    c = client(server.url + "/v1", KEY_A)
    assert c.files.list().data == []  # nothing half-stored by the refused uploads

"""File expiry through the official SDK against the real app (uvicorn in a thread, real SQLite): no model.

Time is advanced by rewriting stored timestamps, never by shortening the API's bounds.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, update

from tests.conftest import API_KEYS, InProcessServer
from tests.server.helpers import CHAT, answer_row, chat_line, client, jsonl, running_batch, upload
from tokenmill.server.driver import BatchDriver
from tokenmill.server.sweeper import Sweeper
from tokenmill.store import expiry
from tokenmill.store.tables import ApiFile, ApiFileChunk

KEY_A, KEY_B = API_KEYS[0], API_KEYS[1]
DAY = 86400


def _age(server: InProcessServer, file_id: str, seconds: float) -> None:
    """Move the file ``seconds`` into the past, as if that much time had gone by."""
    with server.store.session() as s:
        s.execute(
            update(ApiFile)
            .where(ApiFile.id == file_id)
            .values(created_at=ApiFile.created_at - seconds, expires_at=ApiFile.expires_at - seconds)
        )


def _chunks(server: InProcessServer, file_id: str) -> int:
    with server.store.session() as s:
        return int(s.scalar(select(func.count()).where(ApiFileChunk.file_id == file_id)) or 0)


def test_expires_after_sets_expires_at_and_batch_input_defaults_to_30_days(api_app: InProcessServer) -> None:
    c = client(api_app.url + "/v1", KEY_A)
    f = c.files.create(file=("a.jsonl", jsonl([chat_line(0)])), purpose="batch",
                       expires_after={"anchor": "created_at", "seconds": 3600})  # fmt: skip
    assert f.expires_at is not None and f.expires_at - f.created_at in (3600, 3601)
    d = c.files.create(file=("b.jsonl", jsonl([chat_line(0)])), purpose="batch")
    assert d.expires_at is not None and d.expires_at - d.created_at in (30 * DAY, 30 * DAY + 1)
    assert c.files.retrieve(f.id).expires_at == f.expires_at
    assert {x.id: x.expires_at for x in c.files.list()} == {f.id: f.expires_at, d.id: d.expires_at}


@pytest.mark.parametrize(
    ("policy", "param"),
    [
        ({"anchor": "created_at", "seconds": 3599}, "expires_after.seconds"),
        ({"anchor": "created_at", "seconds": 30 * DAY + 1}, "expires_after.seconds"),
        ({"anchor": "last_active_at", "seconds": 3600}, "expires_after.anchor"),
        ({"seconds": 3600}, "expires_after.anchor"),
        ({"anchor": "created_at"}, "expires_after.seconds"),
        ({"anchor": "created_at", "seconds": "3600.5"}, "expires_after.seconds"),
    ],
)
def test_bad_expires_after_is_a_400_naming_the_field(
    api_app: InProcessServer, policy: dict[str, Any], param: str
) -> None:
    c = client(api_app.url + "/v1", KEY_A)
    with pytest.raises(openai.BadRequestError) as err:
        c.files.create(file=("a.jsonl", jsonl([chat_line(0)])), purpose="batch", expires_after=policy)  # type: ignore[arg-type]
    assert err.value.body["param"] == param  # type: ignore[index]
    assert c.files.list().data == []  # nothing stored


@pytest.mark.parametrize(
    "policy",
    [{"anchor": "created_at", "seconds": 60}, {"anchor": "x", "seconds": 3600}, {"anchor": "created_at",
     "seconds": 3600, "extra": 1}, {"anchor": "created_at", "seconds": "3600"}],
)  # fmt: skip
def test_bad_output_expires_after_is_a_400(api_app: InProcessServer, policy: dict[str, Any]) -> None:
    c = client(api_app.url + "/v1", KEY_A)
    fid = upload(c, jsonl([chat_line(0)]))
    with pytest.raises(openai.BadRequestError) as err:
        c.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="24h", output_expires_after=policy)  # type: ignore[arg-type]
    assert str(err.value.body["param"]).startswith("output_expires_after")  # type: ignore[index]


def test_output_files_expire_as_the_batch_asked(api_app: InProcessServer) -> None:
    c = client(api_app.url + "/v1", KEY_A)
    policy = {"anchor": "created_at", "seconds": 7200}
    batch_id, job_id = running_batch(api_app, c, 2, output_expires_after=policy)
    answer_row(api_app, job_id, 0)
    c.batches.cancel(batch_id)
    BatchDriver(api_app.store, api_app.settings).tick()
    b = c.batches.retrieve(batch_id)
    assert b.status == "cancelled" and b.output_file_id and b.error_file_id
    for file_id in (b.output_file_id, b.error_file_id):
        f = c.files.retrieve(file_id)
        assert f.expires_at is not None and f.expires_at - f.created_at in (7199, 7200, 7201)
    plain, _ = running_batch(api_app, c, 1)  # no output_expires_after: its files are kept until deleted
    c.batches.cancel(plain)
    BatchDriver(api_app.store, api_app.settings).tick()
    kept = c.batches.retrieve(plain)
    assert kept.error_file_id and c.files.retrieve(kept.error_file_id).expires_at is None


def test_an_expired_file_is_404_everywhere_then_swept(api_app: InProcessServer) -> None:
    c = client(api_app.url + "/v1", KEY_A)
    data = jsonl([chat_line(i) for i in range(3)])
    f = c.files.create(file=("a.jsonl", data), purpose="batch", expires_after={"anchor": "created_at", "seconds": 3600})
    keep = upload(c, data)
    assert c.files.content(f.id).content == data and _chunks(api_app, f.id) == 1
    _age(api_app, f.id, 3599)
    assert c.files.retrieve(f.id).id == f.id  # a second left
    _age(api_app, f.id, 2)
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        c.files.content(f.id)
    with pytest.raises(openai.NotFoundError):
        c.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        c.files.delete(f.id)
    assert [x.id for x in c.files.list()] == [keep]
    assert _chunks(api_app, f.id) == 1  # absent to readers before the sweeper reclaims it
    assert Sweeper(api_app.store, api_app.settings).tick() == 1
    assert _chunks(api_app, f.id) == 0
    with api_app.store.session() as s:
        assert s.get(ApiFile, f.id) is None and s.get(ApiFile, keep) is not None
    assert c.files.content(keep).content == data and Sweeper(api_app.store, api_app.settings).tick() == 0


def test_the_sweep_is_bounded_per_pass(api_app: InProcessServer) -> None:
    c = client(api_app.url + "/v1", KEY_A)
    ids = [upload(c, jsonl([chat_line(i)])) for i in range(5)]
    for fid in ids:
        _age(api_app, fid, 31 * DAY)
    assert [expiry.sweep_files(api_app.store, limit=2) for _ in range(4)] == [2, 2, 1, 0]
    assert c.files.list().data == []


def test_a_batch_keeps_running_after_its_input_file_expires(api_app: InProcessServer) -> None:
    """The rows were stored when the batch was validated: the input file's expiry does not touch them."""
    c = client(api_app.url + "/v1", KEY_A)
    batch_id, job_id = running_batch(api_app, c, 2)
    b = c.batches.retrieve(batch_id)
    _age(api_app, b.input_file_id, 31 * DAY)
    assert Sweeper(api_app.store, api_app.settings).tick() == 1
    answer_row(api_app, job_id, 0)
    c.batches.cancel(batch_id)
    BatchDriver(api_app.store, api_app.settings).tick()
    done = c.batches.retrieve(batch_id)
    assert done.status == "cancelled" and done.output_file_id
    assert [json.loads(x)["custom_id"] for x in c.files.content(done.output_file_id).text.splitlines()] == ["req-0"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(anchor=st.one_of(st.none(), st.text(max_size=20)), seconds=st.one_of(st.none(), st.text(max_size=12),
       st.integers(-10**12, 10**12).map(str)))  # fmt: skip
def test_any_expires_after_form_is_stored_exactly_or_refused(
    fuzz_server: InProcessServer, anchor: str | None, seconds: str | None
) -> None:
    """Whatever the form fields hold: 200 with expires_at = created_at + seconds when they are valid, else a 400
    naming expires_after.*; never a 500, never a file stored for a refused request."""
    import urllib.error
    import urllib.request

    fields = {"purpose": "batch"}
    if anchor is not None:
        fields["expires_after[anchor]"] = anchor
    if seconds is not None:
        fields["expires_after[seconds]"] = seconds
    boundary = "hypoboundary9876"
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'.encode() + v.encode() + b"\r\n"
        for k, v in fields.items()
    )
    tail = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.jsonl"\r\n\r\n{{}}\n\r\n'
    body = parts + tail.encode() + f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(fuzz_server.url + "/v1/files", data=body, method="POST", headers={
        "Authorization": f"Bearer {KEY_B}", "Content-Type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, answer = resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        status, answer = exc.code, json.loads(exc.read())
    anchor, seconds = anchor or None, seconds or None  # an empty form field is an absent one
    digits = (seconds or "").strip()
    valid = (anchor, seconds) == (None, None) or (
        anchor == "created_at" and digits.isascii() and digits.isdigit() and 3600 <= int(digits) <= 30 * DAY
    )
    if valid:
        want = 30 * DAY if seconds is None else int(digits)
        assert status == 200 and answer["expires_at"] - answer["created_at"] in (want, want + 1), answer
    else:
        assert status == 400 and answer["error"]["param"] in ("expires_after.anchor", "expires_after.seconds")


def test_list_pages_over_live_files_only(api_app: InProcessServer) -> None:
    """An expired file is not counted in a page or in has_more (the filter is in the query)."""
    c = client(api_app.url + "/v1", KEY_A)
    gone = upload(c, jsonl([chat_line(1)]))
    live = upload(c, jsonl([chat_line(0)]))
    _age(api_app, gone, 31 * DAY)
    page = c.files.list(limit=1)
    assert [x.id for x in page.data] == [live] and page.has_more is False

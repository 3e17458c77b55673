"""Batch validation: poisoned lines, values echoed into errors, and serve's model list (no model runs)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import API_KEYS, InProcessServer
from tests.poison_lines import POISON_IDS, POISON_LINES, poisoned_file
from tests.server.helpers import CHAT, MODEL, chat_line, client, jsonl, upload
from tokenmill.config import Settings
from tokenmill.server import validation
from tokenmill.server.driver import BatchDriver
from tokenmill.store.tables import Job

GOOD = json.dumps(chat_line(1)).encode()
BIG = 10 * 2**20  # 10 MB per value: three such lines make a 30 MB file


@pytest.fixture(scope="module")
def big_app(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[InProcessServer]:
    """An in-process API taking uploads of up to 64 MiB; the driver is stepped by hand."""
    base = Settings(data_dir=tmp_path_factory.mktemp("validation") / ".tokenmill", models_dir=models_dir)
    with InProcessServer(base.with_(api_keys=API_KEYS, file_max_bytes=64 * 2**20)) as server:
        yield server


@pytest.mark.parametrize(("poison", "words"), [p[1:] for p in POISON_LINES], ids=POISON_IDS)
def test_check_lines_reports_a_poisoned_line_with_its_number(tmp_path: Path, poison: bytes, words: str) -> None:
    path = tmp_path / "input.jsonl"
    path.write_bytes(poisoned_file(GOOD, poison))
    checked = validation.check_lines(path, CHAT)
    assert checked.lines == 3 and list(checked.errors) == [2]
    error = checked.errors[2]
    assert error["line"] == 2 and error["message"].startswith("invalid JSON: ") and words in error["message"]


def test_a_poisoned_batch_fails_on_the_first_pass_with_line_2(big_app: InProcessServer) -> None:
    """Line 2 nested 100,000 deep: validation used to raise RecursionError and leave the batch validating."""
    c = client(big_app.url + "/v1", API_KEYS[0])
    data = poisoned_file(GOOD, b"[" * 100_000).replace(b'"req-1"', b'"req-3"', 1)  # ids differ
    b = c.batches.create(input_file_id=upload(c, data), endpoint=CHAT, completion_window="24h")
    BatchDriver(big_app.store, big_app.settings).tick()
    b = c.batches.retrieve(b.id)
    assert b.status == "failed" and b.errors is not None
    (error,) = b.errors.data or []
    assert error.line == 2 and error.message == "invalid JSON: nested too deeply"


def test_errors_quote_a_bounded_piece_of_a_30_mb_value(big_app: InProcessServer) -> None:
    """A 10 MB url, a 10 MB model name and a 10 MB field name: the batch object stays small."""
    huge_key = {"custom_id": "k", "method": "POST", "url": CHAT, "body": {**chat_line(3)["body"], "k" * BIG: 1}}
    for lines, line, param in [
        ([chat_line(1), chat_line(2, url="/v1/" + "u" * BIG)], 2, "url"),
        ([chat_line(1, model="m" * BIG)], 1, "body.model"),
        ([chat_line(1), chat_line(2), huge_key], 3, "body." + "k" * 95 + "…"),
    ]:
        c = client(big_app.url + "/v1", API_KEYS[0])
        b = c.batches.create(input_file_id=upload(c, jsonl(lines)), endpoint=CHAT, completion_window="24h")
        BatchDriver(big_app.store, big_app.settings).tick()
        b = c.batches.retrieve(b.id)
        assert b.status == "failed" and b.errors is not None, b.status
        (error,) = b.errors.data or []
        assert error.line == line and error.param == param
        assert len(b.model_dump_json()) < 4000, len(b.model_dump_json())
        assert "…" in (error.message or "") + (error.param or "")


def test_a_model_the_server_does_not_serve_fails_validation_naming_the_line(big_app: InProcessServer) -> None:
    """By default an embedded server serves the models in its models folder: a catalog model that is not
    there is refused, not fetched and loaded for whoever named it."""
    c = client(big_app.url + "/v1", API_KEYS[0])
    lines = [chat_line(1, model="gemma-3-270m"), chat_line(2, model="gemma-3-270m")]
    b = c.batches.create(input_file_id=upload(c, jsonl(lines)), endpoint=CHAT, completion_window="24h")
    BatchDriver(big_app.store, big_app.settings).tick()
    b = c.batches.retrieve(b.id)
    assert b.status == "failed" and b.errors is not None
    assert [e.line for e in b.errors.data or []] == [1, 2]  # each line that names it
    error = (b.errors.data or [])[0]
    assert (error.line, error.param, error.code) == (1, "body.model", "model_not_found")
    assert "'gemma-3-270m' is not served here" in (error.message or "") and MODEL in (error.message or "")
    assert str(big_app.settings.models_dir) not in (error.message or "")  # no server paths to tenants
    with big_app.store.session() as s:
        assert s.query(Job).filter(Job.family == "gemma-3-270m").count() == 0


def test_the_operators_list_decides_which_models_a_batch_may_name(tmp_path: Path) -> None:
    path = tmp_path / "input.jsonl"
    path.write_bytes(jsonl([chat_line(1, model="gemma-3-270m")]))
    settings = Settings(data_dir=tmp_path / ".tokenmill", models_dir=tmp_path / "empty-models")
    refused = validation.check_lines(path, CHAT, settings)  # nothing in the models folder: nothing served
    assert refused.errors[1]["code"] == "model_not_found" and "served: none" in refused.errors[1]["message"]
    allowed = validation.check_lines(path, CHAT, settings.with_(serve_models=("gemma-3-270m",)))
    assert not allowed.errors and allowed.model == "gemma-3-270m"
    anything = validation.check_lines(path, CHAT, settings.with_(serve_models=("*",)))
    assert not anything.errors
    other = validation.check_lines(path, CHAT, settings.with_(serve_models=(MODEL,)))
    assert other.errors[1]["param"] == "body.model" and "is not served here" in other.errors[1]["message"]

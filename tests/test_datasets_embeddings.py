"""/v1/embeddings lines: every OpenAI input form, the encodings, and a job that mixes kinds refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tokenmill.datasets import InvalidLine, read_dataset, validate_dataset
from tokenmill.errors import DatasetError
from tokenmill.rows import CHAT, EMBEDDINGS, DatasetRow


def write(tmp_path: Path, *lines: dict[str, Any]) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(obj) + "\n" for obj in lines), encoding="utf-8")
    return path


def embed_line(cid: str, body: dict[str, Any], url: str | None = "/v1/embeddings") -> dict[str, Any]:
    line: dict[str, Any] = {"custom_id": cid, "method": "POST", "body": body}
    if url is not None:
        line["url"] = url
    return line


def chat_line(cid: str) -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}


def rows_of(path: Path) -> list[DatasetRow]:
    out = [r for r in read_dataset(path)]
    assert all(isinstance(r, DatasetRow) for r in out)
    return [r for r in out if isinstance(r, DatasetRow)]


def test_every_input_form(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        embed_line("s", {"model": "m", "input": "one text", "user": "u1"}),
        embed_line("a", {"model": "m", "input": ["first", "second"], "encoding_format": "base64"}),
        embed_line("t", {"model": "m", "input": [101, 2023, 102]}),
        embed_line("tt", {"model": "m", "input": [[101, 102], [7, 8, 9]], "encoding_format": "float"}),
        embed_line("mixed", {"input": ["text", [5, 6]], "dimensions": 384}),
        embed_line("nourl", {"input": "no url, body decides"}, url=None),
    )
    rows = {r.custom_id: r for r in rows_of(path)}
    assert all(r.endpoint == EMBEDDINGS for r in rows.values())
    assert rows["s"].inputs == ("one text",)
    assert rows["a"].inputs == ("first", "second") and rows["a"].encoding_format == "base64"
    assert rows["t"].inputs == ((101, 2023, 102),)
    assert rows["tt"].inputs == ((101, 102), (7, 8, 9)) and rows["tt"].encoding_format == "float"
    assert rows["mixed"].inputs == ("text", (5, 6)) and rows["mixed"].dimensions == 384
    assert rows["nourl"].inputs == ("no url, body decides",)


def test_payload_round_trip_and_old_payloads_still_load(tmp_path: Path) -> None:
    path = write(tmp_path, embed_line("a", {"input": ["x", [1, 2]], "encoding_format": "base64", "dimensions": 8}))
    row = rows_of(path)[0]
    payload = json.loads(json.dumps(row.to_payload()))  # what the store keeps
    assert DatasetRow.from_payload(row.line, row.custom_id, payload) == row
    old: dict[str, Any] = {"endpoint": CHAT, "messages": [{"role": "user", "content": "hi"}], "prompt": None,
           "params": {"max_tokens": 5, "temperature": 0.0, "top_p": 1.0, "stop": [], "seed": None}, "source": None}
    chat = DatasetRow.from_payload(1, "c", old)
    assert chat.inputs is None and chat.encoding_format == "float" and chat.dimensions is None
    assert "inputs" not in chat.to_payload()  # generation payloads keep their shape


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({}, "body.input", "missing"),
        ({"input": ""}, "body.input", "empty string"),
        ({"input": []}, "body.input", "empty array"),
        ({"input": [[]]}, "body.input[0]", "empty token array"),
        ({"input": ["ok", 3.5]}, "body.input[1]", "string or a token array"),
        ({"input": [[1, "x"]]}, "body.input[0][1]", "token id"),
        ({"input": [-1]}, "body.input[0]", "between 0"),
        ({"input": {"text": "x"}}, "body.input", "got an object"),
        ({"input": "x", "encoding_format": "int8"}, "body.encoding_format", "'float' or 'base64'"),
        ({"input": "x", "dimensions": 0}, "body.dimensions", "at least 1"),
        ({"input": "x", "max_tokens": 5}, "body.max_tokens", "not an embeddings field"),
        ({"input": ["x"] * 2049}, "body.input", "at most 2048"),
    ],
)
def test_bad_bodies_name_line_and_field(tmp_path: Path, body: dict[str, Any], field: str, words: str) -> None:
    path = write(tmp_path, embed_line("ok", {"input": "fine"}), embed_line("bad", body))
    with pytest.raises(DatasetError) as info:
        rows_of(path)
    message = str(info.value)
    assert "in.jsonl:2:" in message and f"field '{field}'" in message and words in message
    assert "\n" not in message


def test_mixed_file_fails_at_first_line_of_the_other_kind(tmp_path: Path) -> None:
    path = write(tmp_path, embed_line("e1", {"input": "a"}), embed_line("e2", {"input": "b"}),
                 chat_line("c3"), chat_line("c4"))
    with pytest.raises(DatasetError) as info:
        rows_of(path)
    message = str(info.value)
    assert "in.jsonl:3:" in message
    assert "a generation request but line 1 made this an embeddings job" in message


def test_mixed_file_every_line_of_the_other_kind_is_invalid(tmp_path: Path) -> None:
    path = write(tmp_path, chat_line("c1"), embed_line("e2", {"input": "b"}), chat_line("c3"),
                 embed_line("e4", {"input": "d"}))
    summary = validate_dataset(path)
    assert summary.rows == 2
    assert [bad.line for bad in summary.invalid] == [2, 4]
    first = summary.invalid[0]
    assert isinstance(first, InvalidLine) and first.custom_id == "e2"
    assert "embeddings request" in first.error.reason and "generation job" in first.error.reason


def test_unknown_endpoint_lists_embeddings(tmp_path: Path) -> None:
    path = write(tmp_path, embed_line("x", {"input": "a"}, url="/v1/moderations"))
    with pytest.raises(DatasetError, match="/v1/embeddings"):
        rows_of(path)


def test_embeddings_rows_are_cacheable_by_their_whole_request() -> None:
    """No sampling: the same inputs, format and size on the same weights give the same body."""
    from tokenmill.cache import request_hash

    row = DatasetRow(1, "a", EMBEDDINGS, inputs=("x", (1, 2)))
    same = DatasetRow(9, "other-id", EMBEDDINGS, inputs=("x", (1, 2)))
    assert request_hash("sha-1", row) is not None
    assert request_hash("sha-1", row) == request_hash("sha-1", same)
    others = [DatasetRow(1, "a", EMBEDDINGS, inputs=("x", (1, 3))),
              DatasetRow(1, "a", EMBEDDINGS, inputs=("x", (1, 2)), encoding_format="base64"),
              DatasetRow(1, "a", EMBEDDINGS, inputs=("x", (1, 2)), dimensions=384)]
    assert len({request_hash("sha-1", r) for r in [row, *others]}) == 4
    assert request_hash("sha-2", row) != request_hash("sha-1", row)


def test_embeddings_lines_must_agree_on_the_model(tmp_path: Path) -> None:
    from tokenmill.request_contract import LineModel

    families = {"all-minilm-l6-v2": "all-minilm-l6-v2", "bge-small-en-v1.5": "bge-small-en-v1.5"}
    model = LineModel(families.get, "all-minilm-l6-v2", "line 1")
    path = write(
        tmp_path,
        embed_line("a", {"model": "all-minilm-l6-v2", "input": "one"}),
        embed_line("b", {"model": "bge-small-en-v1.5", "input": "two"}),
        embed_line("c", {"model": "text-embedding-3-small", "input": "three"}),  # not a catalog name: ignored
    )
    with pytest.raises(DatasetError) as failed:
        list(read_dataset(path, line_model=model))
    assert ":2: field 'body.model'" in str(failed.value) and "one job runs one model" in str(failed.value)
    kept = list(read_dataset(path, line_model=model, skip_invalid=True))
    assert [type(r).__name__ for r in kept] == ["DatasetRow", "InvalidLine", "DatasetRow"]  # line 3: not ours

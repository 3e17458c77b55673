"""The OpenAI request contract at submit: honoured fields land in the row, unknown ones are line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tokenmill import gbnf, structured
from tokenmill.cache import request_hash
from tokenmill.datasets import read_dataset
from tokenmill.errors import DatasetError
from tokenmill.request_contract import Ignored
from tokenmill.rows import CHAT, COMPLETIONS, DatasetRow, SamplingParams

USER = [{"role": "user", "content": "hi"}]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"}},
    "required": ["name", "ok"],
}


def batch(body: dict[str, Any], url: str = CHAT, cid: str = "r1") -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": url, "body": body}


def write(tmp_path: Path, *lines: dict[str, Any]) -> Path:
    path = tmp_path / "batch.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def one(tmp_path: Path, line: dict[str, Any], **kwargs: Any) -> DatasetRow:
    (row,) = list(read_dataset(write(tmp_path, line), **kwargs))
    assert isinstance(row, DatasetRow)
    return row


def error(tmp_path: Path, *lines: dict[str, Any]) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        list(read_dataset(write(tmp_path, *lines)))
    return info.value


def test_every_honoured_sampling_field_lands_in_the_row(tmp_path: Path) -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": USER,
        "max_completion_tokens": 9,
        "temperature": 0.5,
        "presence_penalty": 0.5,
        "frequency_penalty": -1.5,
        "repeat_penalty": 1.1,
        "top_k": 40,
        "min_p": 0.05,
        "logit_bias": {"50256": -100, "13": 2.5},
        "seed": 3,
        "logprobs": True,
        "top_logprobs": 5,
        "user": "u-1",
        "metadata": {"k": "v"},
        "store": False,
        "service_tier": "auto",
        "stream_options": {"include_usage": True},
    }
    p = one(tmp_path, batch(body)).params
    assert (p.max_tokens, p.temperature, p.seed) == (9, 0.5, 3)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -1.5, 1.1)
    assert (p.top_k, p.min_p, p.logprobs) == (40, 0.05, 5)
    assert p.logit_bias == ((13, 2.5), (50256, -100.0))


def test_completion_logprobs_is_a_count(tmp_path: Path) -> None:
    row = one(tmp_path, batch({"prompt": "Once", "logprobs": 3}, url=COMPLETIONS))
    assert row.params.logprobs == 3
    err = error(tmp_path, batch({"prompt": "Once", "logprobs": 6}, url=COMPLETIONS))
    assert err.field == "body.logprobs" and "at most 5" in str(err)


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"messages": USER, "max_token": 5}, "body.max_token", "not a request field"),
        ({"messages": USER, "tools": [{"type": "custom", "custom": {}}]}, "body.tools[0].type", "function tools only"),
        ({"messages": USER, "tool_choice": "required"}, "body.tool_choice", "needs tools"),
        ({"messages": USER, "functions": []}, "body.functions", "legacy functions API"),
        ({"messages": USER, "stream": True, "stream_options": {}}, "body.stream", "streaming"),
        ({"messages": USER, "presence_penalty": 2.5}, "body.presence_penalty", "at most 2"),
        ({"messages": USER, "top_logprobs": 3}, "body.top_logprobs", "needs logprobs: true"),
        ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "body.top_logprobs", "at most 20"),
        ({"messages": USER, "logit_bias": {"x": 1}}, "body.logit_bias", "not a token id"),
        ({"messages": USER, "logit_bias": {"5": 101}}, "body.logit_bias.5", "at most 100"),
        ({"messages": USER, "repetition_penalty": 1.2, "repeat_penalty": 1.3}, "body.repeat_penalty", "set one"),
        ({"messages": USER, "response_format": {"type": "yaml"}}, "body.response_format.type", "unsupported"),
        ({"prompt": "x", "echo": True}, "body.echo", "not supported for completions"),
    ],
)
def test_unknown_or_bad_fields_are_line_errors(tmp_path: Path, body: dict[str, Any], field: str, words: str) -> None:
    url = COMPLETIONS if "prompt" in body else CHAT
    err = error(tmp_path, batch({"messages": USER}, cid="ok"), batch(body, url=url))
    assert err.line == 2 and err.field == field and words in str(err), str(err)
    assert "batch.jsonl" in str(err) and "\n" not in str(err)


def test_plain_lines_are_checked_too(tmp_path: Path) -> None:
    err = error(tmp_path, {"id": 1, "messages": USER, "max_token": 4})
    assert err.field == "max_token" and err.line == 1


def test_allow_unknown_fields_counts_one_warning_per_name(tmp_path: Path) -> None:
    lines = [batch({"messages": USER, "max_token": 4, "functions": []}, cid=f"r{i}") for i in range(3)]
    lines.append(batch({"messages": USER, "foo": 1}, cid="r9"))
    ignored = Ignored()
    rows = list(read_dataset(write(tmp_path, *lines), ignored=ignored))
    assert len(rows) == 4 and all(isinstance(r, DatasetRow) for r in rows)
    assert ignored.lines == {"body.max_token": 3, "body.functions": 3, "body.foo": 1}
    assert ignored.total == 4  # lines carrying an unknown field, not occurrences
    warnings = ignored.warnings()
    assert len(warnings) == 3 and "'body.max_token' on 3 lines (first on line 1)" in " ".join(warnings)
    assert "'body.foo' on 1 line (first on line 4)" in " ".join(warnings)


def test_json_schema_is_stored_for_the_worker_to_enforce(tmp_path: Path) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}}
    row = one(tmp_path, batch({"messages": USER, "response_format": fmt}))
    assert row.params.json_schema is not None and json.loads(row.params.json_schema) == SCHEMA
    assert row.params.grammar is None  # schemas never pass through GBNF
    structured.grammar(row.params.json_schema)  # what the worker compiles, compiles
    plain = one(tmp_path, batch({"messages": USER, "response_format": {"type": "text"}}))
    assert plain.params.json_schema is None and plain.params.grammar is None
    generic = one(tmp_path, batch({"messages": USER, "response_format": {"type": "json_object"}}))
    assert generic.params.json_schema == structured.JSON_OBJECT
    with_schema = one(tmp_path, batch({"messages": USER, "response_format": {"type": "json_object", "schema": SCHEMA}}))
    assert with_schema.params.json_schema == row.params.json_schema


@pytest.mark.parametrize(
    ("fmt", "field"),
    [
        ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "strange"}}}, "json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"$ref": "#/x"}}}, "json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "p", "schema": "x"}}, "json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "p"}}, "json_schema.schema"),
        ({"type": "json_object", "schema": {"type": "string", "pattern": "(("}}, "schema"),
    ],
)
def test_a_schema_that_cannot_compile_names_the_field(tmp_path: Path, fmt: dict[str, Any], field: str) -> None:
    err = error(tmp_path, batch({"messages": USER, "response_format": fmt}))
    assert err.field == f"body.response_format.{field}" and err.line == 1, str(err)


@pytest.mark.parametrize(
    ("grammar", "words"),
    [
        ('root ::= "a" foo', "undefined rule 'foo'"),
        ('item ::= "a"', "no 'root' rule"),
        ('root ::= root "a"', "left-recursive"),
        ('root ::= "a" (', "expecting ')'"),
        ('root ::= "\\q"', "unknown escape"),
        ('root ::= "a"{3,1}', "maximum below its minimum"),  # this one aborts llama.cpp's own parser
        ("root ::= <[12]>", "token references"),
    ],
)
def test_a_grammar_that_cannot_compile_is_a_line_error(tmp_path: Path, grammar: str, words: str) -> None:
    err = error(tmp_path, batch({"messages": USER, "grammar": grammar}))
    assert err.field == "body.grammar" and words in str(err), str(err)


def test_good_grammars_pass_the_check() -> None:
    for text in [
        'root ::= [a-z]+ "x"{2,3}',
        'root ::= ("a" | "b")* "c" # note\n',
        'root ::= "a" | ',
    ]:
        gbnf.check_grammar(text)


def test_old_payloads_load_and_hash_as_before() -> None:
    old: dict[str, Any] = {
        "endpoint": CHAT,
        "messages": USER,
        "prompt": None,
        "params": {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0, "stop": [], "seed": None},
        "source": None,
    }
    row = DatasetRow.from_payload(1, "a", old)
    assert row.params == SamplingParams(max_tokens=8, temperature=0.0)
    assert row.to_payload() == old  # unchanged payload → unchanged cache key for earlier results


def test_cache_key_includes_the_format(tmp_path: Path) -> None:
    base = {"messages": USER, "temperature": 0}
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
    rows = [
        one(tmp_path, batch(base)),
        one(tmp_path, batch({**base, "response_format": {"type": "json_object"}})),
        one(tmp_path, batch({**base, "response_format": fmt})),
        one(tmp_path, batch({**base, "logprobs": True})),
    ]
    keys = {request_hash("m", row) for row in rows}
    assert len(keys) == 4 and None not in keys
    for row in rows:
        again = DatasetRow.from_payload(row.line, row.custom_id, json.loads(json.dumps(row.to_payload())))
        assert again == row


def test_grammar_bombs_are_line_errors_naming_the_field(tmp_path: Path) -> None:
    """A grammar 600 groups deep, one over the size cap, a schema over its cap: each its line's error."""
    deep = "root ::= " + "(" * 600 + '"a"' + ")" * 600
    long_grammar = "root ::= x0\n" + "".join(f'x{i} ::= "a" x{i + 1}\n' for i in range(6000)) + 'x6000 ::= "b"\n'
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(4000)}}
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": wide}}
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"grammar": deep}, "body.grammar", "groups nested more than 100 deep"),
        ({"grammar": long_grammar}, "body.grammar", "is longer than 64 KiB"),
        ({"response_format": fmt}, "body.response_format.json_schema.schema", "is longer than 64 KiB as JSON"),
    ]
    for extra, field, words in cases:
        err = error(tmp_path, batch({"messages": USER, **extra}))
        assert (err.line, err.field) == (1, field) and words in err.reason, str(err)

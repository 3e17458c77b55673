"""/v1/responses lines at submit: every field of the SDK's request is honoured, ignored or refused by name; what
is honoured lands in the row, and what a Response repeats (and the tools) is part of the request's identity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.responses.response_create_params import ResponseCreateParamsBase, ResponseCreateParamsNonStreaming

from tokenmill import structured, tool_calls
from tokenmill.cache import request_hash
from tokenmill.datasets import InvalidLine, read_dataset
from tokenmill.errors import DatasetError
from tokenmill.request_contract import HONOURED, IGNORED, REFUSED
from tokenmill.rows import RESPONSES, DatasetRow

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "maximum": 9}}, "required": ["a"]}
WEATHER = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}


def line(body: dict[str, Any], cid: str = "r1") -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": RESPONSES, "body": {"model": "m", "input": "hi", **body}}


def read(tmp_path: Path, *lines: dict[str, Any]) -> list[DatasetRow | InvalidLine]:
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return list(read_dataset(path, skip_invalid=True))


def one(tmp_path: Path, body: dict[str, Any]) -> DatasetRow:
    (row,) = read(tmp_path, line(body))
    assert isinstance(row, DatasetRow), row
    return row


def error(tmp_path: Path, body: dict[str, Any]) -> DatasetError:
    (bad,) = read(tmp_path, line(body))
    assert isinstance(bad, InvalidLine), bad
    return bad.error


def test_every_sdk_request_field_is_honoured_ignored_or_refused() -> None:
    sdk = set(ResponseCreateParamsBase.__annotations__) | set(ResponseCreateParamsNonStreaming.__annotations__)
    known = HONOURED[RESPONSES] | IGNORED[RESPONSES] | set(REFUSED[RESPONSES])
    assert sdk - known == set()
    assert not HONOURED[RESPONSES] & IGNORED[RESPONSES] and not known & {"messages", "max_tokens"}


def test_honoured_fields_land_in_the_row(tmp_path: Path) -> None:
    body = {
        "input": [
            {"role": "developer", "content": "Be brief."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name a colour."}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Red."}]},
            {"role": "user", "content": "Another."},
        ],
        "instructions": "You are terse.",
        "max_output_tokens": 12,
        "temperature": 0.5,
        "top_p": 0.9,
        "text": {"format": {"type": "json_schema", "name": "pick", "schema": SCHEMA, "strict": True}},
        "metadata": {"team": "eval"},
        "store": False,
        "user": "u1",
        "stream": False,
        "truncation": "disabled",
        "background": False,
        "previous_response_id": None,
        "include": [],
    }
    row = one(tmp_path, body)
    assert row.endpoint == RESPONSES
    assert [m["role"] for m in row.messages or ()] == ["system", "system", "user", "assistant", "user"]
    assert (row.messages or ())[0]["content"] == "You are terse." and (row.messages or ())[3]["content"] == "Red."
    p = row.params
    assert (p.max_tokens, p.temperature, p.top_p, p.tools) == (12, 0.5, 0.9, None)
    assert p.json_schema == structured.check(SCHEMA)
    assert row.echo is not None and row.echo["metadata"] == {"team": "eval"}
    assert row.echo["instructions"] == "You are terse." and row.echo["text"]["format"]["name"] == "pick"
    assert one(tmp_path, {"text": {"format": {"type": "json_object"}}}).params.json_schema == structured.JSON_OBJECT
    assert one(tmp_path, {"text": {"format": {"type": "text"}}}).params.json_schema is None


def test_function_calls_in_the_input_become_turns(tmp_path: Path) -> None:
    row = one(tmp_path, {"input": [
        {"role": "user", "content": "Weather in Oslo and Rome?"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "rain"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "sun"}]},
    ], "tools": [WEATHER]})  # fmt: skip
    system, user, assistant, results = row.messages or ()
    assert "<tools>" in system["content"] and user["content"] == "Weather in Oslo and Rome?"
    assert assistant["role"] == "assistant" and assistant["content"].count("<tool_call>") == 2
    assert results == {"role": "user", "content": tool_calls.tool_response_text(["rain", "sun"])}


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"previous_response_id": "resp_1"}, "body.previous_response_id", "not stored"),
        ({"conversation": "conv_1"}, "body.conversation", "not stored"),
        ({"background": True}, "body.background", "background"),
        ({"reasoning": {"effort": "low"}}, "body.reasoning", "reasoning"),
        ({"include": ["message.output_text.logprobs"]}, "body.include", "not produced"),
        ({"prompt": {"id": "pmpt_1"}}, "body.prompt", "prompt templates"),
        ({"top_logprobs": 2}, "body.top_logprobs", "logprobs"),
        ({"stream": True}, "body.stream", "streaming"),
        ({"truncation": "auto"}, "body.truncation", "only 'disabled'"),
        ({"tools": [{"type": "web_search"}]}, "body.tools[0].type", "built-in tool 'web_search'"),
        ({"tools": [{"type": "file_search", "vector_store_ids": []}]}, "body.tools[0].type", "'file_search'"),
        ({"tools": [{"type": "code_interpreter"}]}, "body.tools[0].type", "'code_interpreter'"),
        ({"tools": [{"type": "computer_use_preview"}]}, "body.tools[0].type", "'computer_use_preview'"),
        ({"tool_choice": {"type": "web_search_preview"}}, "body.tool_choice.type", "not supported"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "body.tool_choice.name", "not one"),
        ({"tools": [WEATHER, WEATHER]}, "body.tools[1]", "used twice"),
        ({"tools": [{**WEATHER, "parameters": {"type": "object", "properties": {"x": {"type": "string",
          "uniqueItems": True}}}}]}, "body.tools[0].parameters.properties.x", "'uniqueItems'"),
        ({"tools": [{**WEATHER, "name": "get weather"}]}, "body.tools[0].name", "not a function name"),
        ({"max_tool_calls": 0}, "body.max_tool_calls", "at least 1"),
        ({"max_output_tokens": 0}, "body.max_output_tokens", "at least 1"),
        ({"temperature": 2.5}, "body.temperature", "at most 2"),
        ({"input": []}, "body.input", "must not be empty"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "body.input[0].type", "'item_reference'"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
         "body.input[0].content[0]", "'input_image'"),
        ({"input": [{"role": "tool", "content": "x"}]}, "body.input[0].role", "unsupported role"),
        ({"text": {"format": {"type": "json_schema", "schema": SCHEMA}}}, "body.text.format.name", "got null"),
        ({"text": {"format": {"type": "json_schema", "name": "p", "schema": {"type": "object", "not": {}}}}},
         "body.text.format.schema", "'not'"),
        ({"text": {"verbosity": "low"}}, "body.text.verbosity", "not supported"),
        ({"metadata": {"k": 1}}, "body.metadata.k", "must be a string"),
        ({"max_tokens": 5}, "body.max_tokens", "not a request field"),
    ],
)  # fmt: skip
def test_refused_fields_are_line_errors_naming_the_field(
    tmp_path: Path, body: dict[str, Any], field: str, words: str
) -> None:
    err = error(tmp_path, body)
    assert err.field == field and words in str(err), str(err)
    assert "\n" not in str(err) and str(err).startswith(f"{tmp_path / 'responses.jsonl'}:1: ")


def test_tools_metadata_and_format_are_part_of_the_cache_key(tmp_path: Path) -> None:
    base: dict[str, Any] = {"temperature": 0, "tools": [WEATHER]}
    variants: list[dict[str, Any]] = [
        base,
        {**base, "tool_choice": "required"},
        {**base, "tool_choice": "none"},
        {**base, "parallel_tool_calls": False},
        {**base, "metadata": {"a": "b"}},
        {**base, "text": {"format": {"type": "json_object"}}},
        {"temperature": 0},
    ]
    hashes = [request_hash("model-sha", one(tmp_path, body)) for body in variants]
    assert None not in hashes and len(set(hashes)) == len(variants)
    assert request_hash("model-sha", one(tmp_path, base)) == hashes[0]


_FIELDS = sorted(HONOURED[RESPONSES] | IGNORED[RESPONSES] | set(REFUSED[RESPONSES]) | {"nonsense"})
_scalars = st.none() | st.booleans() | st.integers(-3, 300) | st.floats(-1, 3) | st.sampled_from(
    ["", "auto", "none", "required", "function", "message", "user", "input_text", "json_schema", "web_search",
     "get_weather", "function_call", "function_call_output", "disabled", "object"]
)  # fmt: skip
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["type", "name", "role", "content", "text", "format", "schema",
                                       "parameters", "call_id", "arguments", "output", "properties"]), inner,
                      max_size=4),
    max_leaves=16,
)  # fmt: skip


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(_FIELDS), _values, max_size=6))
def test_any_body_is_a_row_or_one_line_error(tmp_path: Path, body: dict[str, Any]) -> None:
    """Whatever a Responses body holds, the reader answers with a row or a one-line error naming a body field,
    never an exception of its own."""
    (item,) = read(tmp_path, {"custom_id": "x", "method": "POST", "url": RESPONSES, "body": {"model": "m", **body}})
    if isinstance(item, InvalidLine):
        assert item.error.field is None or item.error.field.startswith("body"), item.error
        assert "\n" not in str(item.error)
    else:
        assert item.messages and item.endpoint == RESPONSES

"""Chat lines with tools at submit: the spec each tool_choice stores, the prompt that lists the tools, the
combinations refused by name, and tools as part of the cache key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tokenmill import structured, tool_calls
from tokenmill.cache import request_hash
from tokenmill.datasets import InvalidLine, read_dataset
from tokenmill.errors import DatasetError
from tokenmill.rows import CHAT, DatasetRow

USER = [{"role": "user", "content": "Add 2 and 3."}]
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}
TOOLS = [
    {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}},
    {"type": "function", "function": {"name": "now"}},
]


def read(tmp_path: Path, body: dict[str, Any]) -> DatasetRow | InvalidLine:
    path = tmp_path / "tools.jsonl"
    line = {"custom_id": "r", "method": "POST", "url": CHAT, "body": {"messages": USER, "tools": TOOLS, **body}}
    path.write_text(json.dumps(line) + "\n", encoding="utf-8")
    (item,) = list(read_dataset(path, skip_invalid=True))
    return item


def row(tmp_path: Path, **body: Any) -> DatasetRow:
    item = read(tmp_path, body)
    assert isinstance(item, DatasetRow), item
    return item


def error(tmp_path: Path, **body: Any) -> DatasetError:
    item = read(tmp_path, body)
    assert isinstance(item, InvalidLine), item
    return item.error


def test_each_tool_choice_is_stored_in_the_spec(tmp_path: Path) -> None:
    auto = row(tmp_path)
    spec = tool_calls.spec_of(auto.params.tools or "")
    assert (spec.choice, spec.name, spec.parallel) == ("auto", None, True)
    assert [t.name for t in spec.tools] == ["add", "now"] and spec.tools[0].parameters == structured.check(ADD)
    assert json.loads(spec.tools[1].parameters) == {"type": "object", "properties": {}, "additionalProperties": False}
    named = tool_calls.spec_of(row(tmp_path, tool_choice={"type": "function", "function": {"name": "add"}},
                                   parallel_tool_calls=False).params.tools or "")  # fmt: skip
    assert (named.choice, named.name, named.parallel) == ("function", "add", False)
    assert [t.name for t in named.offered] == ["add"]
    assert tool_calls.spec_of(row(tmp_path, tool_choice="required").params.tools or "").choice == "required"


def test_the_prompt_lists_the_tools_in_the_system_message(tmp_path: Path) -> None:
    system, user = row(tmp_path).messages or ()
    assert system["role"] == "system" and user == USER[0]
    listed = system["content"].split("<tools>\n", 1)[1].split("\n</tools>", 1)[0].splitlines()
    assert [json.loads(x)["function"]["name"] for x in listed] == ["add", "now"]
    own = row(tmp_path, messages=[{"role": "system", "content": "Be exact."}, *USER]).messages or ()
    assert own[0]["content"].startswith("Be exact.\n\n# Tools") and len(own) == 2
    assert row(tmp_path, tool_choice="none").messages == tuple(USER)  # no call can be made: none listed


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"tool_choice": "required", "tools": []}, "body.tool_choice", "needs tools"),
        ({"tool_choice": "sometimes"}, "body.tool_choice", "must be 'auto', 'none', 'required'"),
        ({"tool_choice": {"type": "function", "function": {"name": "sub"}}}, "body.tool_choice.function.name",
         "not one of the tools"),
        ({"tool_choice": {"type": "allowed_tools", "allowed_tools": {}}}, "body.tool_choice.type", "not supported"),
        ({"parallel_tool_calls": "yes"}, "body.parallel_tool_calls", "true or false"),
        ({"stop": ["\n"]}, "body.stop", "would cut it"),
        ({"grammar": 'root ::= "a"'}, "body.tools", "grammar"),
        ({"tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "string"}}}]},
         "body.tools[0].function.parameters", "type 'object'"),
        ({"tools": [{"type": "function"}]}, "body.tools[0].function", "must be an object"),
        ({"tools": [{"type": "function", "function": {"name": "a.b"}}]}, "body.tools[0].function.name",
         "not a function name"),
        ({"tools": {"add": ADD}}, "body.tools", "must be an array"),
        ({"functions": [{"name": "add"}]}, "body.functions", "legacy functions API"),
        ({"messages": [*USER, {"role": "tool", "content": "5"}]}, "body.messages[1].tool_call_id", "got null"),
        ({"messages": [*USER, {"role": "user", "content": "x", "tool_calls": []}]}, "body.messages[1].tool_calls",
         "only assistant"),
    ],
)  # fmt: skip
def test_bad_tool_fields_are_line_errors_naming_them(
    tmp_path: Path, body: dict[str, Any], field: str, words: str
) -> None:
    err = error(tmp_path, **body)
    assert err.field == field and words in str(err) and "\n" not in str(err), str(err)


def test_a_conversation_with_calls_and_results_is_accepted(tmp_path: Path) -> None:
    history = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}},
            {"id": "c2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
        {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "noon"}]},
    ]  # fmt: skip
    _, user, assistant, results = row(tmp_path, messages=history).messages or ()
    assert user == USER[0]
    spec = tool_calls.spec_of(row(tmp_path).params.tools or "")
    calls, rest = tool_calls.parse(assistant["content"], spec) or ([], "")
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 2, "b": 3}), ("now", {})] and not rest
    assert results["role"] == "user" and results["content"] == tool_calls.tool_response_text(["5", "noon"])


def test_tools_and_tool_choice_change_the_request_hash(tmp_path: Path) -> None:
    bodies: list[dict[str, Any]] = [
        {"temperature": 0},
        {"temperature": 0, "tool_choice": "required"},
        {"temperature": 0, "parallel_tool_calls": False},
        {"temperature": 0, "tools": TOOLS[:1]},
        {"temperature": 0, "tools": []},
    ]
    hashes = [request_hash("sha", row(tmp_path, **body)) for body in bodies]
    assert len(set(hashes)) == len(bodies)

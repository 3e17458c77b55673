"""The JSONL reader: every accepted format, and every kind of bad line reported with file, line and field."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.poison_lines import POISON_IDS, POISON_LINES, poisoned_file
from tokenmill import datasets
from tokenmill.dataset_fields import FieldError
from tokenmill.datasets import DatasetSummary, InvalidLine, json_lines, read_dataset, validate_dataset
from tokenmill.errors import DatasetError, UsageError
from tokenmill.output import rejected_line
from tokenmill.rows import CHAT, COMPLETIONS, DatasetRow, SamplingParams

USER = {"role": "user", "content": "hi"}


def write(tmp_path: Path, *lines: str | bytes | dict[str, Any], name: str = "data.jsonl", nl: bytes = b"\n") -> Path:
    encoded = [
        line if isinstance(line, bytes) else (json.dumps(line) if isinstance(line, dict) else line).encode()
        for line in lines
    ]
    path = tmp_path / name
    path.write_bytes(nl.join(encoded) + nl)
    return path


def rows(path: Path, **kwargs: Any) -> list[DatasetRow]:
    items = list(read_dataset(path, **kwargs))
    out = [r for r in items if isinstance(r, DatasetRow)]
    assert len(out) == len(items)
    return out


def test_batch_chat_line(tmp_path: Path) -> None:
    line = {
        "custom_id": "req-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": "ok", "name": "bot"},
                {"role": "user", "content": "again"},
            ],
            "max_completion_tokens": 12,
            "temperature": 0,
            "top_p": 0.5,
            "stop": ["\n\n", "END"],
            "seed": 7,
            "n": 1,
            "stream": False,
            "logprobs": True,
        },
    }
    (row,) = rows(write(tmp_path, line))
    assert row.custom_id == "req-1" and row.endpoint == CHAT and row.line == 1 and row.prompt is None
    assert row.messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
    )
    assert row.params == SamplingParams(
        max_tokens=12, temperature=0.0, top_p=0.5, stop=("\n\n", "END"), seed=7, logprobs=0
    )
    assert DatasetRow.from_payload(row.line, row.custom_id, json.loads(json.dumps(row.to_payload()))) == row


def test_batch_completions_line(tmp_path: Path) -> None:
    line = {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Once", "max_tokens": 3}}
    (row,) = rows(write(tmp_path, line))
    assert (row.endpoint, row.prompt, row.messages, row.params.max_tokens) == (COMPLETIONS, "Once", None, 3)


def test_batch_line_without_url_infers_the_endpoint(tmp_path: Path) -> None:
    chat, comp = rows(write(tmp_path, {"custom_id": "a", "body": {"messages": [USER]}}, {"body": {"prompt": "p"}}))
    assert (chat.endpoint, comp.endpoint, comp.custom_id) == (CHAT, COMPLETIONS, "line-2")


def test_chat_and_prompt_lines(tmp_path: Path) -> None:
    chat, prompt = rows(
        write(
            tmp_path,
            {"id": 7, "messages": [USER], "temperature": 0.2, "model": "ignored"},
            {"prompt": "Complete: ", "stop": "\n", "max_tokens": 5},
        )
    )
    assert chat.custom_id == "7" and chat.endpoint == CHAT and chat.messages == (USER,)
    assert chat.params.temperature == 0.2
    assert prompt.custom_id == "line-2" and prompt.endpoint == COMPLETIONS and prompt.prompt == "Complete: "
    assert prompt.params.stop == ("\n",) and prompt.params.max_tokens == 5


def test_template_builds_a_user_message_from_top_level_fields(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {"id": "r1", "title": "Q3", "text": "Sales rose.", "pages": 3, "tags": ["a"], "temperature": 30},
    )
    (row,) = rows(path, template="Summarize {title} ({pages} pages, {tags}): {text} {{literal}}")
    assert row.endpoint == CHAT and row.custom_id == "r1"
    assert row.messages == ({"role": "user", "content": 'Summarize Q3 (3 pages, ["a"]): Sales rose. {literal}'},)
    assert row.params == SamplingParams()  # data keys that look like sampling params are data


def test_text_field_takes_the_prompt_from_a_field(tmp_path: Path) -> None:
    (row,) = rows(write(tmp_path, {"body": "the report", "n": 5}), text_field="body")
    assert row.messages == ({"role": "user", "content": "the report"},)


def test_template_with_text_field_reads_text_from_that_field(tmp_path: Path) -> None:
    (row,) = rows(write(tmp_path, {"article": "words", "lang": "fr"}), template="[{lang}] {text}", text_field="article")
    assert row.messages == ({"role": "user", "content": "[fr] words"},)


def test_ids_prefer_custom_id_then_id_then_physical_line(tmp_path: Path) -> None:
    path = write(
        tmp_path, {"custom_id": "a", "id": "b", "prompt": "x"}, "", {"id": None, "prompt": "x"}, {"prompt": "y"}
    )
    assert [r.custom_id for r in rows(path)] == ["a", "line-3", "line-4"]


def test_defaults_fill_absent_params_and_lines_override(tmp_path: Path) -> None:
    defaults = SamplingParams(max_tokens=50, temperature=0.0, seed=1)
    path = write(tmp_path, {"prompt": "x"}, {"prompt": "y", "max_tokens": 9, "temperature": None, "seed": 2})
    first, second = rows(path, defaults=defaults)
    assert first.params == defaults
    assert second.params == SamplingParams(max_tokens=9, temperature=0.0, seed=2)


def test_crlf_bom_blank_lines_and_trailing_blank_line(tmp_path: Path) -> None:
    path = tmp_path / "win.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n\r\n   \r\n{"prompt": "b"}\r\n\r\n')
    assert [(r.line, r.prompt) for r in rows(path)] == [(1, "a"), (4, "b")]


def test_last_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "b"}')
    assert [r.prompt for r in rows(path)] == ["a", "b"]


def test_rows_stream_before_a_bad_line_is_reached(tmp_path: Path) -> None:
    path = write(tmp_path, *([{"prompt": "ok"}] * 4), "{broken")
    it = read_dataset(path)
    assert [next(it).line for _ in range(4)] == [1, 2, 3, 4]
    with pytest.raises(DatasetError) as exc:
        next(it)
    assert exc.value.line == 5


def ok(extra: dict[str, Any] | None = None) -> str:
    return json.dumps({"prompt": "x", **(extra or {})})


def chat(messages: Any) -> str:
    return json.dumps({"messages": messages})


def batch(body: Any, url: str = "/v1/chat/completions", method: str = "POST") -> str:
    return json.dumps({"custom_id": "b", "method": method, "url": url, "body": body})


BAD_LINES: list[tuple[str, str | bytes, str | None, str]] = [
    ("trailing-comma", '{"prompt": "x",}', None, "invalid JSON: Expecting property name enclosed in double quotes"),
    ("missing-comma", '{"prompt": "x" "max_tokens": 3}', None, "invalid JSON: Expecting ',' delimiter at column 16"),
    ("two-objects", '{"prompt": "x"} {"prompt": "y"}', None, "invalid JSON: Extra data at column 17"),
    ("nan", '{"prompt": "x", "temperature": NaN}', None, "NaN is not a JSON value"),
    ("deep", '{"a": ' + "[" * 100_000, None, "invalid JSON: nested too deeply"),
    ("huge-int", '{"prompt": "x", "seed": 1' + "0" * 5000 + "}", None, "invalid JSON: a number has too many digits"),
    ("bad-utf8", b'{"prompt": "caf\xe9"}', None, "invalid JSON: invalid UTF-8 byte 0xe9 at byte column 16"),
    ("array", "[1, 2]", None, "expected a JSON object, got array"),
    ("number", "42", None, "expected a JSON object, got number"),
    ("string", '"hello"', None, "expected a JSON object, got string"),
    ("null", "null", None, "expected a JSON object, got null"),
    ("no-prompt", '{"text": "x", "title": "y"}', None, "no 'messages', 'prompt' or 'body' — use --template"),
    ("empty-object", "{}", None, "no 'messages', 'prompt' or 'body'"),
    ("both", json.dumps({"prompt": "x", "messages": [USER]}), None, "has both 'messages' and 'prompt'"),
    ("method", batch({"messages": [USER]}, method="GET"), "method", "unsupported method 'GET' (batch lines use POST)"),
    (
        "endpoint",
        batch({"input": "x"}, url="/v1/moderations"),
        "url",
        "unsupported endpoint '/v1/moderations' (tokenmill serves /v1/chat/completions, /v1/completions,"
        " /v1/responses and /v1/embeddings)",
    ),
    ("no-body", json.dumps({"custom_id": "b", "method": "POST", "url": "/v1/completions"}), "body", "missing"),
    ("body-type", batch([1]), "body", "must be an object, got an array"),
    ("batch-no-messages", batch({"prompt": "x"}), "body.messages", "missing (/v1/chat/completions needs messages)"),
    ("batch-no-prompt", batch({"messages": [USER]}, url="/v1/completions"), "body.prompt", "missing"),
    ("prompt-list", batch({"prompt": ["a", "b"]}, url="/v1/completions"), "body.prompt", "a list of prompts"),
    ("token-array", batch({"prompt": [1, 2, 3]}, url="/v1/completions"), "body.prompt", "token arrays"),
    ("batch-n", batch({"messages": [USER], "n": 17}), "body.n", "must be at most 16"),
    ("batch-stream", batch({"messages": [USER], "stream": True}), "body.stream", "streaming is not supported"),
    ("batch-temp", batch({"messages": [USER], "temperature": 3}), "body.temperature", "got 3"),
    ("messages-type", chat("hi"), "messages", "must be an array of messages, got a string"),
    ("messages-empty", chat([]), "messages", "must not be empty"),
    ("message-type", chat(["hi"]), "messages[0]", "must be an object with 'role' and 'content'"),
    ("role-missing", chat([{"content": "x"}]), "messages[0].role", "missing"),
    ("role-type", chat([{"role": 1, "content": "x"}]), "messages[0].role", "must be a string, got 1"),
    ("role-fn", chat([USER, {"role": "function", "content": "x"}]), "messages[1].role", "unsupported role 'function'"),
    ("tool-no-id", chat([USER, {"role": "tool", "content": "x"}]), "messages[1].tool_call_id", "got null"),
    ("content-missing", chat([{"role": "user"}]), "messages[0].content", "missing"),
    ("content-null", chat([{"role": "user", "content": None}]), "messages[0].content", "got null"),
    (
        "image",
        chat([USER, USER, {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        "messages[2].content[0]",
        "content part type 'image_url' is not supported (text only)",
    ),
    ("parts-empty", chat([{"role": "user", "content": []}]), "messages[0].content", "must not be an empty array"),
    ("part-text", chat([{"role": "user", "content": [{"type": "text"}]}]), "messages[0].content[0].text", "missing"),
    (
        "tool-calls",
        chat([USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "t"}]}]),
        "messages[1].tool_calls[0].function",
        "must be an object with 'name' and 'arguments'",
    ),
    ("prompt-type", '{"prompt": 5}', "prompt", "must be a string, got 5"),
    ("prompt-empty", '{"prompt": "  "}', "prompt", "is empty"),
    ("surrogate", '{"prompt": "a\\ud800b"}', "prompt", "unpaired UTF-16 surrogate (\\ud800)"),
    ("max-bool", ok({"max_tokens": True}), "max_tokens", "must be an integer, got true"),
    ("max-negative", ok({"max_tokens": -1}), "max_tokens", "must be at least 1, got -1"),
    ("max-zero", ok({"max_tokens": 0}), "max_tokens", "must be at least 1, got 0"),
    ("max-fraction", ok({"max_tokens": 1.5}), "max_tokens", "must be an integer, got 1.5"),
    ("max-float", ok({"max_tokens": 10.0}), "max_tokens", "must be an integer, got 10.0"),
    ("max-string", ok({"max_tokens": "10"}), "max_tokens", "must be an integer, got a string"),
    ("max-huge", ok({"max_tokens": 2**31}), "max_tokens", "must be at most 2147483647"),
    ("mct-zero", ok({"max_completion_tokens": 0}), "max_completion_tokens", "must be at least 1"),
    ("max-conflict", ok({"max_tokens": 5, "max_completion_tokens": 6}), "max_completion_tokens", "set one"),
    ("temp-bool", ok({"temperature": True}), "temperature", "must be a number, got true"),
    ("temp-low", ok({"temperature": -0.1}), "temperature", "must be at least 0 and at most 2, got -0.1"),
    ("temp-high", ok({"temperature": 2.5}), "temperature", "got 2.5"),
    ("temp-inf", '{"prompt": "x", "temperature": 1e400}', None, "invalid JSON: the number 1e400 is too large"),
    ("top-p-zero", ok({"top_p": 0}), "top_p", "must be greater than 0 and at most 1, got 0"),
    ("top-p-high", ok({"top_p": 1.5}), "top_p", "got 1.5"),
    ("stop-many", ok({"stop": ["a", "b", "c", "d", "e"]}), "stop", "has 5 stop sequences; at most 4"),
    ("stop-item", ok({"stop": ["a", 1]}), "stop[1]", "must be a string, got 1"),
    ("stop-empty", ok({"stop": ""}), "stop", "is empty"),
    ("stop-type", ok({"stop": {"a": 1}}), "stop", "must be a string or an array of strings, got an object"),
    ("seed-float", ok({"seed": 1.0}), "seed", "must be an integer, got 1.0"),
    ("seed-negative", ok({"seed": -1}), "seed", "must be at least 0"),
    ("seed-huge", ok({"seed": 2**32}), "seed", "must be at most 4294967295"),
    ("n", ok({"n": 99}), "n", "must be at most 16"),
    ("n-zero", ok({"n": 0}), "n", "must be at least 1"),
    ("stream", ok({"stream": True}), "stream", "streaming is not supported in batch jobs"),
    ("stream-type", ok({"stream": "yes"}), "stream", "must be true or false, got a string"),
    ("id-type", ok({"custom_id": 1.5}), "custom_id", "must be a string or an integer, got 1.5"),
    ("id-array", ok({"id": []}), "id", "must be a string or an integer, got an array"),
    ("id-empty", ok({"custom_id": ""}), "custom_id", "must not be empty"),
    ("id-newline", ok({"custom_id": "a\nb"}), "custom_id", "must not contain control characters"),
    ("id-long", ok({"custom_id": "x" * 600}), "custom_id", "is 600 characters long; at most 512"),
    ("id-surrogate", '{"custom_id": "\\udfff", "prompt": "x"}', "custom_id", "unpaired UTF-16 surrogate"),
]


@pytest.mark.parametrize(("line", "field", "fragment"), [c[1:] for c in BAD_LINES], ids=[c[0] for c in BAD_LINES])
def test_bad_line_names_file_line_and_field(
    tmp_path: Path, line: str | bytes, field: str | None, fragment: str
) -> None:
    path = write(tmp_path, ok(), "", line, ok())
    with pytest.raises(DatasetError) as exc:
        list(read_dataset(path))
    err = exc.value
    message = str(err)
    assert (err.line, err.field, err.path) == (3, field, str(path))
    prefix = f"{path}:3: field '{field}': " if field else f"{path}:3: "
    assert message.startswith(prefix), message
    assert fragment in message, message
    assert "\n" not in message and len(message) < 400
    assert "Traceback" not in message and "Error(" not in message


TEMPLATE_BAD: list[tuple[str, dict[str, Any], str | None, str | None, str]] = [
    ("missing", {"text": "x"}, "{title}: {text}", None, "field 'title': missing (the template uses {title})"),
    ("null", {"text": None}, "{text}", None, "field 'text': is null"),
    ("field-missing", {"body": "x"}, None, "text", "field 'text': missing (chosen with --field)"),
    ("field-type", {"text": ["x"]}, None, "text", "field 'text': must be a string, got an array"),
    ("field-empty", {"text": ""}, None, "text", "field 'text': is empty"),
    ("id", {"text": "x", "id": {"a": 1}}, "{text}", None, "field 'id': must be a string or an integer"),
]


@pytest.mark.parametrize(
    ("obj", "template", "text_field", "fragment"), [c[1:] for c in TEMPLATE_BAD], ids=[c[0] for c in TEMPLATE_BAD]
)
def test_bad_template_rows(
    tmp_path: Path, obj: dict[str, Any], template: str | None, text_field: str | None, fragment: str
) -> None:
    path = write(tmp_path, {"text": "fine", "title": "t"}, obj)
    with pytest.raises(DatasetError) as exc:
        list(read_dataset(path, template=template, text_field=text_field))
    assert exc.value.line == 2 and str(exc.value).startswith(f"{path}:2: ") and fragment in str(exc.value)


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("{text.__class__}", "only top-level fields"),
        ("{text[0]}", "only top-level fields"),
        ("{}", "need a field name"),
        ("{0}", "need a field name"),
        ("{text!r}", "format specs and conversions"),
        ("{text:>10}", "format specs and conversions"),
        ("no placeholders", "no {field} placeholders"),
        ("{text", "invalid template: expected '}' before end of string"),
        ("text}", "invalid template: Single '}' encountered"),
    ],
)
def test_bad_templates_fail_before_reading(tmp_path: Path, template: str, fragment: str) -> None:
    with pytest.raises(UsageError) as exc:
        read_dataset(tmp_path / "missing.jsonl", template=template)
    assert fragment in str(exc.value)


def test_duplicate_ids_name_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, {"custom_id": "a", "prompt": "x"}, {"prompt": "y"}, {"custom_id": "a", "prompt": "z"})
    with pytest.raises(DatasetError) as exc:
        list(read_dataset(path))
    assert str(exc.value) == f"{path}:3: field 'custom_id': duplicate id 'a' (first used on line 1)"


def test_explicit_id_colliding_with_a_generated_one(tmp_path: Path) -> None:
    path = write(tmp_path, {"prompt": "x"}, {"id": "line-1", "prompt": "y"})
    with pytest.raises(DatasetError, match=r":2: field 'id': duplicate id 'line-1' \(first used on line 1\)"):
        list(read_dataset(path))


def test_overlong_line_is_reported_and_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "MAX_LINE_BYTES", 64)
    path = write(tmp_path, ok(), json.dumps({"prompt": "x" * 5000}), ok({"id": "after"}))
    items = list(read_dataset(path, skip_invalid=True))
    assert isinstance(items[1], InvalidLine) and "line is longer than" in str(items[1].error)
    assert [(i.line, type(i).__name__) for i in items] == [(1, "DatasetRow"), (2, "InvalidLine"), (3, "DatasetRow")]


def test_skip_invalid_yields_invalid_lines_in_place(tmp_path: Path) -> None:
    path = write(tmp_path, ok(), "{bad", "", {"custom_id": "k", "prompt": 3}, ok({"id": "k"}), "[]", ok())
    items = list(read_dataset(path, skip_invalid=True))
    assert [(type(i).__name__, i.line) for i in items] == [
        ("DatasetRow", 1),
        ("InvalidLine", 2),
        ("InvalidLine", 4),
        ("DatasetRow", 5),
        ("InvalidLine", 6),
        ("DatasetRow", 7),
    ]
    bad = [i for i in items if isinstance(i, InvalidLine)]
    assert [b.custom_id for b in bad] == [None, "k", None]
    assert [b.error.line for b in bad] == [2, 4, 6]


def test_validate_dataset_counts_and_bounds_what_it_keeps(tmp_path: Path) -> None:
    path = write(tmp_path, ok(), *(["{bad"] * 5), ok())
    summary = validate_dataset(path, keep_invalid=2)
    assert isinstance(summary, DatasetSummary)
    assert (summary.rows, len(summary.invalid), summary.invalid_count) == (2, 2, 5)
    assert [i.line for i in summary.invalid] == [2, 3]


def test_validate_dataset_passes_options_through(tmp_path: Path) -> None:
    path = write(tmp_path, {"text": "a"}, {"other": "b"})
    summary = validate_dataset(path, template="Say {text}")
    assert summary.rows == 1 and summary.invalid[0].error.field == "text"


def test_error_line_has_the_openai_batch_error_shape(tmp_path: Path) -> None:
    path = write(tmp_path, ok(), {"custom_id": "q", "prompt": 1}, "nope")
    bad = validate_dataset(path).invalid
    assert rejected_line(bad[0], "data.jsonl") == {
        "id": None,
        "custom_id": "q",
        "response": None,
        "error": {
            "code": "invalid_request",
            "message": "data.jsonl:2: field 'prompt': must be a string, got 1",
            "line": 2,
        },
    }
    second = rejected_line(bad[1], path)
    assert second["custom_id"] == "line-3" and second["error"]["message"].startswith(f"{path}:3: invalid JSON")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "the file is empty (no rows)"),
        (b"\n\r\n  \n", "has no rows (only blank lines)"),
        (b'{"prompt": "x"}\x00\x00\x01binary', "looks like a binary file, expected JSONL text"),
        (gzip.compress(b'{"prompt": "x"}\n'), "looks like a gzip file (decompress it first), expected JSONL text"),
        (b"PK\x03\x04\x14\x00rest", "looks like a zip archive"),
        ('{"prompt": "x"}\n'.encode("utf-16"), "looks like UTF-16 text (save it as UTF-8)"),
    ],
    ids=["empty", "blank", "nul", "gzip", "zip", "utf16"],
)
def test_file_level_errors(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(DatasetError) as exc:
        list(read_dataset(path))
    assert exc.value.line is None and str(exc.value).startswith(f"{path}: {fragment}")


def test_missing_file_and_directory_fail_at_call_time(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope\.jsonl: file not found$"):
        read_dataset(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match=r": is a directory, expected a JSONL file$"):
        validate_dataset(tmp_path)


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, ok())

    def deny(self: Path, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", deny)
    with pytest.raises(DatasetError) as exc:
        read_dataset(path)
    assert str(exc.value) == f"{path}: permission denied"


def test_summary_of_a_clean_file(tmp_path: Path) -> None:
    path = write(tmp_path, *[ok({"id": i}) for i in range(50)])
    assert validate_dataset(path) == DatasetSummary(rows=50, invalid=[])


@pytest.mark.parametrize(("poison", "words"), [p[1:] for p in POISON_LINES], ids=POISON_IDS)
def test_a_poisoned_line_is_an_invalid_json_line_error(tmp_path: Path, poison: bytes, words: str) -> None:
    """Line 2 nested 100,000 deep, not UTF-8, with NUL, an infinite or million-digit number: line 2's error."""
    path = tmp_path / "poison.jsonl"
    path.write_bytes(poisoned_file(ok().encode(), poison))
    with pytest.raises(DatasetError) as exc:
        list(read_dataset(path))
    assert exc.value.line == 2 and str(exc.value).startswith(f"{path}:2: invalid JSON: "), str(exc.value)
    assert words in str(exc.value) and len(str(exc.value)) < 300
    parsed = list(json_lines(path, str(path)))
    assert [line for line, _ in parsed] == [1, 2, 3] and isinstance(parsed[1][1], FieldError)


def test_a_number_too_long_is_refused_even_with_the_interpreters_digit_limit_off(tmp_path: Path) -> None:
    """Python's own int-digit cap is a process-wide setting; the reader's cap holds without it."""
    path = write(tmp_path, ok(), '{"prompt": "x", "seed": 1' + "0" * 5000 + "}")
    before = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        with pytest.raises(DatasetError, match=r":2: invalid JSON: a number has too many digits"):
            list(read_dataset(path))
    finally:
        sys.set_int_max_str_digits(before)


def test_nul_on_a_later_line_is_that_lines_error_not_a_binary_file(tmp_path: Path) -> None:
    path = write(tmp_path, ok(), b'{"prompt": "a\x00b"}', ok())
    (item,) = [x for x in read_dataset(path, skip_invalid=True) if isinstance(x, InvalidLine)]
    assert item.line == 2 and "invalid JSON" in str(item.error)

"""Fuzzing the JSONL reader: whatever bytes a file holds, only DatasetError may come out.

Besides raw bytes, lines are built from near-valid requests (right keys, mostly right types) so the
fuzzer reaches deep into message, batch and parameter validation rather than stopping at JSON syntax.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.datasets import read_dataset, validate_dataset
from tokenmill.errors import DatasetError
from tokenmill.output import rejected_line
from tokenmill.rows import CHAT, COMPLETIONS, DatasetRow, SamplingParams

KEYS = [
    "custom_id", "id", "method", "url", "body", "messages", "prompt", "role", "content", "type", "text",
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "tool_calls",
    "title",
]  # fmt: skip
WORDS = ["POST", "GET", CHAT, COMPLETIONS, "/v1/embeddings", "user", "system", "developer", "tool", "text", "image_url"]
RAW_LINES = [b"", b"\r", b"\xef\xbb\xbf{}", b'{"prompt": "\\ud800"}', b'{"custom_id": "\\udc00x", "prompt": "p"}']
FUZZ_OPTIONS: list[dict[str, Any]] = [
    {},
    {"template": "{text} / {title}"},
    {"text_field": "text"},
    {"template": "[{title}] {text}", "text_field": "prompt", "defaults": SamplingParams(max_tokens=3)},
]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(WORDS)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=5)
    ),
    max_leaves=24,
)
json_objects = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), json_values, max_size=7)


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(good, good, good, bad)


text_parts = st.lists(
    st.fixed_dictionaries(
        {"type": mostly(st.just("text"), st.just("image_url")), "text": mostly(st.text(), json_scalars)}
    ),
    min_size=1,
    max_size=3,
)
message = st.fixed_dictionaries(
    {
        "role": mostly(st.sampled_from(["user", "system", "developer", "assistant"]), json_scalars),
        "content": mostly(st.text(max_size=10) | text_parts, json_values),
    },
    optional={"tool_calls": json_values},
)
param_values = {
    "max_tokens": st.integers(min_value=-1, max_value=2**31),
    "max_completion_tokens": st.integers(min_value=0, max_value=10),
    "temperature": st.floats(min_value=-1, max_value=3),
    "top_p": st.floats(min_value=0, max_value=1.5),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5),
    "seed": st.integers(min_value=-1, max_value=2**33),
    "n": st.integers(min_value=0, max_value=3),
    "stream": st.booleans(),
}
params = st.fixed_dictionaries({}, optional={k: mostly(v, json_scalars) for k, v in param_values.items()})
ids = st.fixed_dictionaries(
    {}, optional={k: mostly(st.sampled_from(["a", "b", "line-1", 1]), json_scalars) for k in ("id", "custom_id")}
)
messages_body = st.builds(
    lambda m, p: {**p, "messages": m}, mostly(st.lists(message, min_size=1, max_size=3), json_values), params
)
prompt_body = st.builds(lambda q, p: {**p, "prompt": q}, mostly(st.text(min_size=1, max_size=10), json_values), params)
request_body = messages_body | prompt_body
near_valid = (
    st.builds(lambda b, i: {**b, **i}, request_body, ids)
    | st.builds(
        lambda b, i, url, method: {**i, "url": url, "method": method, "body": b},
        mostly(request_body, json_values),
        ids,
        mostly(st.sampled_from([CHAT, COMPLETIONS]), st.just("/v1/embeddings") | json_scalars),
        mostly(st.just("POST"), st.just("GET") | json_scalars),
    )
    | st.builds(lambda t, i: {"text": t, "title": t, "prompt": t, **i}, mostly(st.text(min_size=1), json_values), ids)
)
fuzz_lines = st.lists(
    near_valid.map(lambda o: json.dumps(o).encode())
    | near_valid.map(lambda o: json.dumps(o).encode())
    | json_objects.map(lambda o: json.dumps(o).encode())
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=40)
    | st.sampled_from(RAW_LINES),
    max_size=8,
)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def exercise(path: Path, options: dict[str, Any]) -> None:
    """Only DatasetError may escape, and whatever comes out must survive the store and the errors file."""
    try:
        list(read_dataset(path, **options))
    except DatasetError as exc:
        assert "\n" not in str(exc)
    try:
        summary = validate_dataset(path, **options)
    except DatasetError as exc:
        assert "\n" not in str(exc) and exc.line is None
        return
    for bad in summary.invalid:
        record = rejected_line(bad, path)
        assert "\n" not in record["error"]["message"]
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    for item in read_dataset(path, **options, skip_invalid=True):
        if isinstance(item, DatasetRow):
            payload = json.loads(json.dumps(item.to_payload(), ensure_ascii=False).encode("utf-8"))
            assert DatasetRow.from_payload(item.line, item.custom_id, payload) == item
            item.custom_id.encode("utf-8")


FUZZ = settings(max_examples=300, deadline=None, database=None)


@FUZZ
@given(data=st.binary(max_size=3000))
def test_fuzz_arbitrary_bytes(fuzz_dir: Path, data: bytes) -> None:
    path = fuzz_dir / "bytes.jsonl"
    path.write_bytes(data)
    exercise(path, {})


@FUZZ
@given(lines=fuzz_lines, newline=st.sampled_from([b"\n", b"\r\n"]), options=st.sampled_from(FUZZ_OPTIONS))
def test_fuzz_json_lines(fuzz_dir: Path, lines: list[bytes], newline: bytes, options: dict[str, Any]) -> None:
    path = fuzz_dir / "lines.jsonl"
    path.write_bytes(newline.join(lines))
    exercise(path, options)

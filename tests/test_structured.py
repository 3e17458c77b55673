"""JSON schemas at submit and in the matcher, with no model: refused naming the keyword, or enforced.

The enforcement half walks the very grammar a worker decodes with (``structured.grammar``) over a byte
vocabulary, taking random allowed bytes until the matcher allows the end: whatever it lets through must
parse, hold no raw control character and validate against the schema, formats included. Hypothesis draws
the schemas from every keyword family tokenmill accepts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import jsonschema
import jsonschema_rs
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llguidance import LLMatcher, LLTokenizer, TokenizerWrapper

from tokenmill import structured
from tokenmill.datasets import read_dataset
from tokenmill.errors import DatasetError
from tokenmill.rows import CHAT, DatasetRow

SCHEMA_FIELD = "body.response_format.json_schema.schema"
_KEYS = sorted(structured.KEYWORDS | {"uniqueItems", "not", "x-y", "nullable"})
EOS = 256


def _fmt(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}


def _line(tmp_path: Path, body: dict[str, Any]) -> Path:
    path = tmp_path / "f.jsonl"
    line = {"custom_id": "a", "method": "POST", "url": CHAT, "body": body}
    path.write_text(json.dumps(line) + "\n", encoding="utf-8")
    return path


def _refusal(tmp_path: Path, schema: Any) -> DatasetError:
    body = {"messages": [{"role": "user", "content": "hi"}], "response_format": _fmt(schema)}
    with pytest.raises(DatasetError) as info:
        list(read_dataset(_line(tmp_path, body)))
    return info.value


def test_an_unsupported_keyword_is_a_line_error_naming_it(tmp_path: Path) -> None:
    err = _refusal(tmp_path, {"type": "array", "uniqueItems": True})
    assert str(err) == f"{tmp_path / 'f.jsonl'}:1: field '{SCHEMA_FIELD}': keyword 'uniqueItems' is not supported"


@pytest.mark.parametrize(
    ("schema", "where", "words"),
    [
        ({"type": "string", "maxLenght": 3}, "", "keyword 'maxLenght' is not supported"),  # a typo is not ignored
        ({"type": "string", "nullable": True}, "", "keyword 'nullable' is not supported"),
        ({"properties": {"t": {"type": "array", "contains": {}}}}, ".properties.t", "keyword 'contains'"),
        ({"$defs": {"a": {"not": {"type": "null"}}}, "$ref": "#/$defs/a"}, ".$defs.a", "keyword 'not'"),
        ({"if": {"type": "string"}, "then": {"minLength": 1}}, "", "keyword 'if'"),
        ({"type": "object", "propertyNames": {"pattern": "^a"}}, "", "keyword 'propertyNames'"),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, "", "keyword 'dependentRequired'"),
        ({"type": "object", "unevaluatedProperties": False}, "", "keyword 'unevaluatedProperties'"),
        ({"type": "string", "x-guidance": {"lenient": True}}, "", "keyword 'x-guidance'"),
        ({"anyOf": [{"type": "string", "contentEncoding": "base64"}]}, ".anyOf.0", "keyword 'contentEncoding'"),
        ({"type": "array", "items": [{"type": "string"}]}, "", "'prefixItems'"),  # draft-4 tuple form
        ({"type": "number", "minimum": 0, "exclusiveMinimum": True}, "", "'exclusiveMinimum' must be a number"),
        ({"type": "integer", "multipleOf": -2}, "", "'multipleOf' must be greater than 0"),
        ({"type": "string", "format": "ipv5"}, "", "format 'ipv5' is not supported"),
        ({"type": "string", "format": "uri-reference"}, "", "format 'uri-reference' is not supported"),
        ({"type": "string", "pattern": "(?=a)a"}, "", "keyword 'pattern'"),
        ({"oneOf": [{"type": "object"}, {"type": "object"}]}, "", "keyword 'oneOf'"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "", "minimum (5) is greater than maximum (1)"),
        ({"$ref": "#/$defs/missing"}, "", "does not exist"),
        ({"properties": {"a": {}}, "minProperties": 1}, "", "keywords 'minProperties' and 'maxProperties'"),
        ({"properties": {"a b": {"type": "string", "foo": 1}}}, ".properties['a b']", "keyword 'foo'"),
    ],
)
def test_what_cannot_be_enforced_is_refused_at_submit(tmp_path: Path, schema: Any, where: str, words: str) -> None:
    err = _refusal(tmp_path, schema)
    assert err.line == 1 and err.field == SCHEMA_FIELD + where, str(err)
    assert words in err.reason and "\n" not in str(err), str(err)


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(_KEYS), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(schema=st.dictionaries(st.sampled_from(_KEYS), _JSON, max_size=5))
def test_any_schema_is_accepted_or_refused_in_one_line(schema: dict[str, Any]) -> None:
    """Hostile schemas (keywords holding any JSON value) never crash the submit: a SchemaError or a grammar."""
    try:
        text = structured.check(schema)
    except structured.SchemaError as exc:
        assert exc.message and "\n" not in exc.message
    else:
        assert structured.grammar(text)


def test_a_deeply_nested_schema_is_refused_not_crashed(tmp_path: Path) -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(300):
        schema = {"type": "array", "items": schema}
    err = _refusal(tmp_path, schema)
    assert err.field == SCHEMA_FIELD and err.reason == "the schema is nested too deeply", str(err)


def test_a_stop_string_cannot_cut_a_json_row(tmp_path: Path) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "response_format": _fmt({"type": "object"}), "stop": "}"}
    with pytest.raises(DatasetError) as info:
        list(read_dataset(_line(tmp_path, body)))
    assert info.value.field == "body.stop" and "JSON" in info.value.reason


def test_every_accepted_keyword_reaches_the_row(tmp_path: Path) -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "t",
        "description": "d",
        "type": "object",
        "properties": {
            "n": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25, "default": 0.5},
            "i": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 6},
            "s": {"type": "string", "minLength": 1, "maxLength": 9, "pattern": "^[a-z]+$", "examples": ["ab"]},
            "d": {"type": "string", "format": "date", "deprecated": False},
            "e": {"enum": ["x", 1, None]},
            "c": {"const": {"k": [1]}},
            "a": {"type": "array", "prefixItems": [{"type": "boolean"}], "items": {"$ref": "#/$defs/leaf"}},
            "b": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
            "o": {"anyOf": [{"type": "null"}, {"$ref": "#"}]},
            "m": {"type": "object", "additionalProperties": {"type": "string"}, "maxProperties": 2},
        },
        "patternProperties": {"^x-": {"type": "string"}},
        "required": ["n", "i"],
        "additionalProperties": False,
        "$defs": {"leaf": {"type": "string", "readOnly": True}},
        "definitions": {"other": {"type": "string", "writeOnly": True, "$comment": "c"}},
    }
    used = set(_keys(schema))
    assert used == structured.KEYWORDS - {"oneOf", "allOf", "minProperties"}, used ^ structured.KEYWORDS
    body = {"messages": [{"role": "user", "content": "hi"}], "response_format": _fmt(schema)}
    (row,) = list(read_dataset(_line(tmp_path, body)))
    assert isinstance(row, DatasetRow) and row.params.json_schema is not None
    assert json.loads(row.params.json_schema) == schema


def _keys(schema: Any) -> list[str]:
    if not isinstance(schema, dict):
        return []
    out = list(schema)
    for key, value in schema.items():
        for sub, _ in structured._subschemas(key, value, ()):
            out += _keys(sub)
    return out


# -- enforcement: random walks through the compiled matcher ------------------------------------------------


class _Bytes:
    """A vocabulary of the 256 single bytes plus an end token: every string is reachable byte by byte."""

    tokens = [bytes([i]) for i in range(256)] + [b"\xff<end>"]
    eos_token_id = EOS
    bos_token_id = None
    special_token_ids = [EOS]

    def __call__(self, text: str | bytes) -> list[int]:
        return list(text.encode() if isinstance(text, str) else text)


_TOKENIZER = LLTokenizer(TokenizerWrapper(_Bytes()))
_WEIGHTS = np.array([30.0 if chr(b) in '"}],' else 1.0 if 0x20 <= b < 0x7F else 0.05 for b in range(256)] + [30.0])


def walk(schema: dict[str, Any], rng: random.Random, limit: int = 400) -> bytes | None:
    """One random output the matcher allows, or None when it did not finish within ``limit`` bytes."""
    matcher = LLMatcher(_TOKENIZER, structured.grammar(structured.check(schema)), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    out = bytearray()
    for _ in range(limit):
        mask = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.flatnonzero(np.unpackbits(mask, bitorder="little")[: EOS + 1])
        assert len(allowed), "the matcher allows nothing: it would stall the row"
        weights = _WEIGHTS[allowed]
        token = int(rng.choices(allowed.tolist(), weights=weights.tolist())[0])
        if token == EOS:
            return bytes(out)
        assert matcher.consume_token(token), matcher.get_error()
        out.append(token)
    return None


_FORMAT_CHECKED = ("date", "date-time", "time", "email", "ipv4", "ipv6", "uuid", "duration", "hostname", "uri")
_RS_FORMATS = ("date", "date-time", "time", "ipv4", "ipv6", "uuid", "duration")


def assert_valid(schema: dict[str, Any], raw: bytes) -> None:
    value = json.loads(raw.decode("utf-8"))  # strict: a raw control character inside a string fails here
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    jsonschema.Draft202012Validator(schema, format_checker=checker).validate(value)
    # jsonschema checks date-time, time and duration only with optional packages; jsonschema-rs always does
    # (its email, hostname and uri also limit lengths, which tokenmill's formats do not: see the README)
    if not any(f'"format": "{f}"' in json.dumps(schema) for f in ("email", "hostname", "uri")):
        assert jsonschema_rs.validator_for(schema, validate_formats=True).is_valid(value), (schema, raw)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5}}},
        {"type": "number", "maximum": 1},
        {"type": "number", "exclusiveMinimum": -0.5, "exclusiveMaximum": 0.25},
        {"type": "integer", "multipleOf": 7, "minimum": -30, "maximum": 30},
        {"type": "string"},
        {"type": "object"},
        *({"type": "string", "format": f} for f in _FORMAT_CHECKED),
        {
            "$defs": {"t": {"type": "object", "properties": {"k": {"type": "array", "items": {"$ref": "#/$defs/t"}}}}},
            "$ref": "#/$defs/t",
        },
    ],
    ids=lambda s: json.dumps(s)[:48],
)
def test_what_the_matcher_lets_through_validates(schema: dict[str, Any]) -> None:
    rng = random.Random(7)
    done = [out for out in (walk(schema, rng) for _ in range(40)) if out is not None]
    assert len(done) >= 20
    for out in done:
        assert_valid(schema, out)


@pytest.mark.parametrize(
    "schema", [{"type": "string"}, {"type": "object"}, {"type": "string", "pattern": "^[\\s\\S]*$"}]
)
def test_no_raw_control_character_inside_a_string(schema: dict[str, Any]) -> None:
    """A newline in a string is written \\n; the raw byte would make the row's JSON unparsable."""
    matcher = LLMatcher(_TOKENIZER, structured.grammar(structured.check(schema)), log_level=0)
    opening = b'"a' if schema.get("type") == "string" else b'{"k": "a'
    assert matcher.consume_tokens(list(opening)), matcher.get_error()
    bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
    assert not bits[:0x20].any() and bits[ord("\\")] and bits[ord("b")]
    assert matcher.consume_tokens(list(b"\\n")), "the escaped newline is allowed"


def test_dates_are_calendar_dates_python_parses() -> None:
    """February 29 only in leap years, no second 60: what datetime.fromisoformat reads back."""
    import datetime

    rng = random.Random(5)
    leap = {"type": "string", "format": "date", "pattern": "-02-29$"}
    for out in filter(None, (walk(leap, rng) for _ in range(30))):
        year = int(json.loads(out)[:4])
        assert datetime.date.fromisoformat(json.loads(out)) and year % 4 == 0, out
    stamp = {"type": "string", "format": "date-time"}
    for out in filter(None, (walk(stamp, rng) for _ in range(30))):
        assert datetime.datetime.fromisoformat(json.loads(out)), out


def test_decimal_multiple_of_is_exact() -> None:
    """0.7 is a multiple of 0.1 in the decimal the JSON spells (jsonschema's float division says not)."""
    from decimal import Decimal

    rng = random.Random(3)
    for _ in range(30):
        out = walk({"type": "number", "multipleOf": 0.1, "minimum": -2, "maximum": 2}, rng)
        if out is not None:
            assert Decimal(out.decode()) % Decimal("0.1") == 0, out


_NUM = st.integers(-50, 50).map(lambda n: n / 4)
_LEAVES = st.one_of(
    st.builds(
        lambda a, b: {"type": "integer", "minimum": min(a, b), "maximum": max(a, b)},
        st.integers(-99, 99),
        st.integers(-99, 99),
    ),
    st.builds(lambda a, w: {"type": "number", "minimum": a, "maximum": a + w}, _NUM, st.integers(0, 40)),
    st.builds(lambda a: {"type": "number", "exclusiveMaximum": a}, _NUM),
    st.builds(lambda m: {"type": "integer", "multipleOf": m}, st.integers(1, 12)),
    st.builds(lambda m: {"type": "number", "multipleOf": m, "maximum": 100}, st.sampled_from([0.5, 0.25, 2, 5])),
    st.builds(
        lambda a, w: {"type": "string", "minLength": a, "maxLength": a + w}, st.integers(0, 4), st.integers(0, 6)
    ),
    st.sampled_from(["^[A-Z]{2}-[0-9]{3}$", "^(yes|no)$", "^\\w+@x\\.org$", "^[^\\n]{0,8}$"]).map(
        lambda p: {"type": "string", "pattern": p}
    ),
    st.sampled_from(_FORMAT_CHECKED).map(lambda f: {"type": "string", "format": f}),
    st.lists(
        st.one_of(st.integers(-5, 5), st.text(max_size=4), st.none(), st.booleans()),
        min_size=1,
        max_size=4,
        unique_by=json.dumps,
    ).map(lambda v: {"enum": v}),
    st.sampled_from([{"const": "fixed"}, {"const": [1, {"a": None}]}, {"type": "boolean"}, {"type": "null"}]),
)


def _extend(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    objects = st.dictionaries(st.text("abcxyz", min_size=1, max_size=3), children, min_size=1, max_size=3).flatmap(
        lambda props: st.builds(
            lambda req, extra: {
                "type": "object",
                "properties": props,
                "required": [k for k in props if k in req],
                "additionalProperties": extra,
            },
            st.sets(st.sampled_from(sorted(props))),
            st.booleans(),
        )
    )
    arrays = st.builds(
        lambda items, low, width: {"type": "array", "items": items, "minItems": low, "maxItems": low + width},
        children,
        st.integers(0, 2),
        st.integers(0, 2),
    )
    any_of = st.lists(children, min_size=2, max_size=3).map(lambda subs: {"anyOf": subs})
    return st.one_of(objects, arrays, any_of)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=st.recursive(_LEAVES, _extend, max_leaves=6), seed=st.integers(0, 2**16))
def test_random_schemas_are_enforced_or_refused_never_loosened(schema: dict[str, Any], seed: int) -> None:
    try:
        structured.check(schema)
    except structured.SchemaError:
        return  # refused, with a message: fine (e.g. an anyOf of two overlapping enums is still allowed)
    rng = random.Random(seed)
    for _ in range(4):
        out = walk(schema, rng)
        if out is not None:
            assert_valid(schema, out)

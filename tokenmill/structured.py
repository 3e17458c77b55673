"""JSON schemas for structured output: each keyword enforced while decoding, or refused at submit.

Schemas are compiled by llguidance (the grammar engine behind llama.cpp's LLGuidance build, vLLM and
SGLang), which turns numeric bounds, ``multipleOf``, string lengths, ``pattern``, ``format``, array
sizes, ``anyOf``/``$ref`` (recursion included) into a token-level matcher. Submit and worker call the same
:func:`grammar`, so a schema accepted here is exactly the one decoding enforces. llguidance refuses the
keywords it knows it cannot enforce, but quietly passes over names it does not know (a misspelt keyword,
OpenAPI's ``nullable``, draft-4 forms); a silently dropped keyword is the one failure this module exists
to prevent, so every key of every subschema must be on :data:`KEYWORDS`, or the schema is refused naming it.

This module never touches llama.cpp: the submitting host may have no model and must not load ggml.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

MAX_SCHEMA_CHARS = 256 * 1024
JSON_OBJECT = '{"type":"object"}'  # {"type": "json_object"}: any JSON object
FORMATS = ("date", "date-time", "time", "duration", "email", "hostname", "ipv4", "ipv6", "uri", "uuid")
ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$comment", "$schema", "deprecated", "readOnly", "writeOnly"}
)
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions"})  # name → subschema
_SCHEMA_LISTS = frozenset({"anyOf", "oneOf", "allOf", "prefixItems"})
_SCHEMA_ONE = frozenset({"items", "additionalProperties"})
_NUMBERS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"})
_VALUES = frozenset(
    {"type", "enum", "const", "required", "$ref", "pattern", "format", "minLength", "maxLength", "minItems",
     "maxItems", "minProperties", "maxProperties"}
)  # fmt: skip
KEYWORDS = _SCHEMA_MAPS | _SCHEMA_LISTS | _SCHEMA_ONE | _NUMBERS | _VALUES | ANNOTATIONS
# Every JSON separator spot takes one space, or a newline and up to 20 indentation characters (as
# llama.cpp's converter allows): pretty-printed JSON stays possible, a run of blank lines does not.
_OPTIONS = {
    "lenient": False,
    "coerce_one_of": False,
    "whitespace_pattern": r"(?:\x20|\x0A[\x20\x09]{0,20})?",
}


class SchemaError(ValueError):
    """The schema asks for what decoding cannot enforce. ``path`` is where in the schema (keys from its root)."""

    def __init__(self, message: str, path: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.path = path


def schema_text(schema: dict[str, Any]) -> str:
    """The schema as compact JSON, the form rows store and :func:`grammar` compiles."""
    try:
        text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (RecursionError, ValueError):
        raise SchemaError("the schema is nested too deeply") from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise SchemaError(f"the schema is longer than {MAX_SCHEMA_CHARS // 1024} KiB")
    return text


def check(schema: dict[str, Any]) -> str:
    """Refuse any keyword decoding would not enforce; returns the stored text of a schema that compiles."""
    text = schema_text(schema)
    grammar(text)
    return text


def grammar(text: str) -> str:
    """The llguidance grammar of a stored schema, validated by llguidance's own compiler; SchemaError if not."""
    compiled = _compile(text)
    if isinstance(compiled, SchemaError):
        raise SchemaError(compiled.message, compiled.path)
    return compiled


@lru_cache(maxsize=256)
def _compile(text: str) -> str | SchemaError:
    """Refusals are cached too: a file repeating one bad schema on every line (--skip-invalid) compiles it once."""
    try:
        return _compile_uncached(text)
    except SchemaError as exc:
        return exc


def _compile_uncached(text: str) -> str:
    from llguidance import LLMatcher  # a few ms to import; only rows that ask for JSON pay it

    try:
        schema = json.loads(text)
    except (RecursionError, ValueError):
        raise SchemaError("the schema is nested too deeply") from None
    if not isinstance(schema, dict):
        raise SchemaError("the schema must be a JSON object")
    try:
        _check_keywords(schema, ())
        strict = _strict_formats(schema)
    except RecursionError:
        raise SchemaError("the schema is nested too deeply") from None
    try:
        compiled = LLMatcher.grammar_from_json_schema(strict, overrides=_OPTIONS)  # type: ignore[arg-type]
        failed, messages = LLMatcher.validate_grammar_with_warnings(compiled)
    except (ValueError, RuntimeError) as exc:
        raise SchemaError(_explain(str(exc))) from None
    if failed:
        raise SchemaError(_explain(messages[0] if messages else "the schema cannot be compiled"))
    return compiled


def inline_schema(text: str) -> str:
    """A stored schema as an llguidance ``%json { … }`` body: the form :func:`grammar` compiles (stricter date
    formats, tokenmill's whitespace and options), for grammars that embed a schema (tool call arguments)."""
    grammar(text)  # refuses what this schema would have been refused for on its own
    schema = _strict_formats(json.loads(text))
    return json.dumps({**schema, "x-guidance": _OPTIONS}, ensure_ascii=False, separators=(",", ":"))


def _subschemas(key: str, value: Any, path: tuple[str, ...]) -> Iterator[tuple[Any, tuple[str, ...]]]:
    if key in _SCHEMA_MAPS and isinstance(value, dict):
        for name, sub in value.items():
            yield sub, (*path, key, name)
    elif key in _SCHEMA_LISTS and isinstance(value, list):
        for i, sub in enumerate(value):
            yield sub, (*path, key, str(i))
    elif key in _SCHEMA_ONE:
        yield value, (*path, key)


def _check_keywords(schema: Any, path: tuple[str, ...]) -> None:
    if not isinstance(schema, dict):
        return  # true/false subschemas, and shapes llguidance itself refuses with a message
    for key, value in schema.items():
        if key not in KEYWORDS:
            hint = _HINTS.get(key, "")
            raise SchemaError(f"keyword {_quote(key)} is not supported{hint}", path)
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not _is_number(value):
            raise SchemaError(f"keyword {_quote(key)} must be a number (JSON Schema 2020-12)", path)
        if key == "multipleOf" and _is_number(value) and value <= 0:
            raise SchemaError("keyword 'multipleOf' must be greater than 0", path)
        if key == "items" and isinstance(value, list):
            raise SchemaError("keyword 'items' must be a schema; a list of schemas is 'prefixItems'", path)
        if key == "format" and isinstance(value, str) and value not in FORMATS:
            raise SchemaError(f"format {_quote(value)} is not supported (supported: {', '.join(FORMATS)})", path)
        for sub, where in _subschemas(key, value, path):
            _check_keywords(sub, where)


def _strict_formats(schema: Any) -> Any:
    """The schema with date, time and date-time as tokenmill's stricter patterns (see :data:`_STRICT`)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _strict_formats(sub) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [_strict_formats(sub) for sub in value]
        elif key in _SCHEMA_ONE:
            out[key] = _strict_formats(value)
    fmt = out.get("format")
    strict = _STRICT.get(fmt) if isinstance(fmt, str) else None
    if strict is not None:
        del out["format"]
        pattern = f"^(?:{strict})$"
        if "pattern" in out:
            out["allOf"] = [*out.get("allOf", []), {"pattern": pattern}]
        else:
            out["pattern"] = pattern
    return out


# llguidance's own date formats let through 02-29 of any year, second 60 at any minute and year 0000: RFC
# 3339's grammar, but not dates Python's datetime (or jsonschema's date check) can parse. These allow
# only real calendar dates (years 0001-9999), seconds 00-59, an upper-case T and Z, and 1-9 fraction digits.
_YEAR = r"(?:[0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})"
_LEAP = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (
    rf"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    rf"|02-(?:0[1-9]|1[0-9]|2[0-8]))|{_LEAP}-02-29)"
)
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_STRICT = {"date": _DATE, "time": _TIME, "date-time": f"{_DATE}T{_TIME}"}

_HINTS = {
    "nullable": ' (write the type as a list with \'null\', e.g. ["string", "null"])',
    "additionalItems": " (use 'prefixItems' and 'items')",
    "x-guidance": " (tokenmill sets llguidance's options itself)",
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _quote(name: str) -> str:
    text = json.dumps(name, ensure_ascii=False)[1:-1]
    return f"'{text[:60]}…'" if len(text) > 60 else f"'{text}'"


_UNIMPLEMENTED = re.compile(r'Unimplemented keys: \["([^"]+)"')
_FORMAT = re.compile(r"Unknown format: (.+)")


def _explain(message: str) -> str:
    """llguidance's error as one line that names the keyword where it can."""
    found = _UNIMPLEMENTED.search(message)
    if found:
        return f"keyword {_quote(found.group(1))} is not supported"
    found = _FORMAT.search(message)
    if found:
        return f"format {_quote(found.group(1).strip())} is not supported (supported: {', '.join(FORMATS)})"
    if "recursion limit exceeded" in message:
        return "the schema is nested too deeply"
    if "min/maxProperties only supported" in message:
        return "keywords 'minProperties' and 'maxProperties' are supported only when every property listed is required"
    if message.startswith("oneOf constraints are not supported"):
        return "keyword 'oneOf' is supported only when no value can match two of its branches; use anyOf"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if lines and lines[0].startswith("regex parse error"):
        return f"keyword 'pattern' is not a regular expression llguidance runs: {lines[-1].removeprefix('error: ')}"
    text = " ".join(" ".join(lines).split())
    return text[:200] or "the schema cannot be compiled"

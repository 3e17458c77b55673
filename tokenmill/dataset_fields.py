"""Checks for the fields inside one dataset line, and prompt templates.

Validators raise :class:`FieldError` carrying a dotted field path and no location: the reader adds file
and line, so the same checks serve JSONL lines, OpenAI batch bodies and document rows. User-supplied
values reach messages only through :func:`show` and :func:`describe`, so a stray newline, a lone surrogate
or a megabyte-long string can never break the one-line error contract.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenmill import tool_calls
from tokenmill.errors import UsageError

ROLES = {"system": "system", "user": "user", "assistant": "assistant", "developer": "system"}
TEXT_PART_TYPES = frozenset({"text", "input_text"})
MAX_STOP = 4
MAX_TOKENS_LIMIT = 2**31 - 1
SEED_LIMIT = 2**32 - 1  # llama.cpp seeds are unsigned 32-bit
MAX_ID_LENGTH = 512  # the store's custom_id column
MAX_FIELD_CHARS = 100  # a field path in an error (user keys)
MAX_MESSAGE_CHARS = 1000  # an error message, whatever it quotes
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class FieldError(Exception):
    """A problem with one field (or the whole object when ``field`` is None), location added by the caller."""

    def __init__(self, message: str, field: str | None = None) -> None:
        message, field = bounded(message, MAX_MESSAGE_CHARS), None if field is None else bounded(field, MAX_FIELD_CHARS)
        super().__init__(message)
        self.message = message
        self.field = field


def bounded(text: str, limit: int) -> str:
    """Field paths carry the line's own keys, which may be megabytes long; a message never grows with them."""
    return text if len(text) <= limit else text[:limit] + "…"


def show(value: Any, limit: int = 60) -> str:
    """Quote a user value for a message: escaped, surrogate-safe, truncated."""
    if not isinstance(value, str):
        return describe(value)
    text = json.dumps(value[: limit + 1], ensure_ascii=False)[1:-1]  # a 30 MB value is never copied whole
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > limit:
        text = text[:limit] + "…"
    return f"'{text}'"


def describe(value: Any) -> str:
    """Name a JSON value the way a person reading the file would, never as a Python repr."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        digits = str(value)
        return digits if len(digits) <= 24 else digits[:24] + "…"
    if isinstance(value, float):
        return json.dumps(value)
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def check_encodable(text: str, field: str | None) -> str:
    """JSON escapes can smuggle lone surrogates into a str; they would fail later, at store or output."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = f"\\u{ord(text[exc.start]):04x}"
            raise FieldError(f"contains an unpaired UTF-16 surrogate ({bad})", field) from None
    return text


def text_value(value: Any, field: str, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise FieldError(f"must be a string, got {describe(value)}", field)
    if not allow_empty and not value.strip():
        raise FieldError("is empty", field)
    return check_encodable(value, field)


def integer(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(f"must be an integer, got {describe(value)}", field)
    if value < low:
        raise FieldError(f"must be at least {low}, got {describe(value)}", field)
    if value > high:
        raise FieldError(f"must be at most {high}, got {describe(value)}", field)
    return value


def number(value: Any, field: str, low: float, high: float, *, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(f"must be a number, got {describe(value)}", field)
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or value > high:
        bound = f"greater than {low:g}" if low_open else f"at least {low:g}"
        raise FieldError(f"must be {bound} and at most {high:g}, got {describe(value)}", field)
    return float(value)


def sampling_overrides(src: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The sampling parameters a line sets, as keyword arguments for ``SamplingParams``; null means unset."""
    _refuse_unsupported(src, prefix)
    out: dict[str, Any] = {}
    max_tokens = None
    for key in ("max_tokens", "max_completion_tokens"):
        if src.get(key) is not None:
            value = integer(src[key], prefix + key, 1, MAX_TOKENS_LIMIT)
            if max_tokens is not None and value != max_tokens:
                raise FieldError(f"is {value} but max_tokens is {max_tokens}; set one of them", prefix + key)
            max_tokens = value
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    if src.get("temperature") is not None:
        out["temperature"] = number(src["temperature"], prefix + "temperature", 0.0, 2.0)
    if src.get("top_p") is not None:
        out["top_p"] = number(src["top_p"], prefix + "top_p", 0.0, 1.0, low_open=True)
    if src.get("stop") is not None:
        out["stop"] = _stop(src["stop"], prefix + "stop")
    if src.get("seed") is not None:
        out["seed"] = integer(src["seed"], prefix + "seed", 0, SEED_LIMIT)
    return out


def _refuse_unsupported(src: Mapping[str, Any], prefix: str) -> None:
    """Streaming has no meaning in a batch job; refuse it rather than answer in another shape."""
    stream = src.get("stream")
    if stream is True:
        raise FieldError("streaming is not supported in batch jobs; remove it", prefix + "stream")
    if stream is not None and stream is not False:
        raise FieldError(f"must be true or false, got {describe(stream)}", prefix + "stream")


def _stop(value: Any, field: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (_stop_text(value, field),)
    if not isinstance(value, list):
        raise FieldError(f"must be a string or an array of strings, got {describe(value)}", field)
    if len(value) > MAX_STOP:
        raise FieldError(f"has {len(value)} stop sequences; at most {MAX_STOP} are allowed", field)
    return tuple(_stop_text(item, f"{field}[{i}]") for i, item in enumerate(value))


def _stop_text(value: Any, field: str) -> str:
    """Whitespace such as a blank line is a useful stop sequence; only the empty string is meaningless."""
    if value == "":
        raise FieldError("is empty", field)
    return text_value(value, field)


def messages(value: Any, field: str) -> tuple[dict[str, str], ...]:
    """Text chat messages, normalized to ``{"role", "content"}`` with developer mapped to system.

    Earlier tool calls (an assistant's ``tool_calls``) and their results (``tool`` messages) become text in
    the format tokenmill prompts tools with (:mod:`tokenmill.tool_calls`); consecutive results share a turn.
    """
    if not isinstance(value, list):
        raise FieldError(f"must be an array of messages, got {describe(value)}", field)
    if not value:
        raise FieldError("must not be empty", field)
    out: list[dict[str, str]] = []
    results: list[str] = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise FieldError(f"must be an object with 'role' and 'content', got {describe(message)}", where)
        if message.get("role") == "tool":
            results.append(_tool_result(message, where))
            continue
        if results:
            out.append({"role": "user", "content": tool_calls.tool_response_text(results)})
            results = []
        out.append(_message(message, where))
    if results:
        out.append({"role": "user", "content": tool_calls.tool_response_text(results)})
    return tuple(out)


def _message(message: dict[str, Any], where: str) -> dict[str, str]:
    if "role" not in message:
        raise FieldError("missing", f"{where}.role")
    role = message["role"]
    if not isinstance(role, str):
        raise FieldError(f"must be a string, got {describe(role)}", f"{where}.role")
    if role not in ROLES:
        raise FieldError(
            f"unsupported role {show(role)} (system, user, assistant, developer, tool)", f"{where}.role"
        )
    if message.get("function_call") is not None:
        raise FieldError("the legacy function_call is not supported; use tool_calls", f"{where}.function_call")
    calls = message.get("tool_calls")
    if calls is not None and role == "assistant":
        content = message.get("content")
        text = content_text(content, f"{where}.content") if content is not None else None
        return {"role": "assistant", "content": tool_calls.assistant_text(text, _calls(calls, f"{where}.tool_calls"))}
    if calls is not None:
        raise FieldError("only assistant messages carry tool calls", f"{where}.tool_calls")
    if "content" not in message:
        raise FieldError("missing", f"{where}.content")
    return {"role": ROLES[role], "content": content_text(message["content"], f"{where}.content")}


def _calls(value: Any, field: str) -> list[tuple[str, str]]:
    """An assistant's earlier ``tool_calls``: (name, arguments) of each function call."""
    if not isinstance(value, list):
        raise FieldError(f"must be an array of tool calls, got {describe(value)}", field)
    out = []
    for j, call in enumerate(value):
        where = f"{field}[{j}]"
        if not isinstance(call, dict):
            raise FieldError(f"must be a tool call object, got {describe(call)}", where)
        if call.get("type", "function") != "function":
            raise FieldError(f"tool call type {show(call.get('type'))} is not supported (function only)", where)
        function = call.get("function")
        if not isinstance(function, dict):
            raise FieldError(f"must be an object with 'name' and 'arguments', got {describe(function)}",
                             f"{where}.function")  # fmt: skip
        name = text_value(function.get("name"), f"{where}.function.name", allow_empty=False)
        out.append((name, text_value(function.get("arguments", "{}"), f"{where}.function.arguments")))
    return out


def _tool_result(message: dict[str, Any], where: str) -> str:
    text_value(message.get("tool_call_id"), f"{where}.tool_call_id", allow_empty=False)
    if "content" not in message:
        raise FieldError("missing", f"{where}.content")
    return content_text(message["content"], f"{where}.content")


def content_text(value: Any, field: str, kinds: frozenset[str] = TEXT_PART_TYPES) -> str:
    if isinstance(value, str):
        return check_encodable(value, field)
    if not isinstance(value, list):
        raise FieldError(f"must be a string or an array of text parts, got {describe(value)}", field)
    if not value:
        raise FieldError("must not be an empty array", field)
    texts = []
    for j, part in enumerate(value):
        where = f"{field}[{j}]"
        if not isinstance(part, dict):
            raise FieldError(f"must be a text part object, got {describe(part)}", where)
        kind = part.get("type")
        if kind not in kinds:
            raise FieldError(f"content part type {show(kind)} is not supported (text only)", where)
        if "text" not in part:
            raise FieldError("missing", f"{where}.text")
        texts.append(text_value(part["text"], f"{where}.text"))
    return "\n".join(texts)


def prompt(value: Any, field: str) -> str:
    if isinstance(value, list):
        if value and all(_is_tokens(item) for item in value):
            raise FieldError("token arrays are not supported; send the prompt as text", field)
        raise FieldError("a list of prompts is not supported; put each prompt on its own line", field)
    return text_value(value, field, allow_empty=False)


def _is_tokens(item: Any) -> bool:
    if isinstance(item, list):
        return all(_is_tokens(x) for x in item) if item else True
    return isinstance(item, int) and not isinstance(item, bool)


def id_key(obj: Mapping[str, Any]) -> str | None:
    """Which key supplies the row id: ``custom_id`` wins over ``id``; None means one is generated."""
    for key in ("custom_id", "id"):
        if obj.get(key) is not None:
            return key
    return None


def row_id(obj: Mapping[str, Any], line: int) -> str:
    key = id_key(obj)
    if key is None:
        return f"line-{line}"
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise FieldError(f"must be a string or an integer, got {describe(value)}", key)
    text = value if isinstance(value, str) else str(value)
    if not text.strip():
        raise FieldError("must not be empty", key)
    if len(text) > MAX_ID_LENGTH:
        raise FieldError(f"is {len(text)} characters long; at most {MAX_ID_LENGTH} are allowed", key)
    if _CONTROL.search(text):
        raise FieldError("must not contain control characters (newlines, tabs)", key)
    return check_encodable(text, key)


@dataclass(frozen=True)
class Template:
    """A prompt template compiled once; only plain ``{field}`` placeholders, looked up as top-level keys.

    ``str.format_map`` would let ``{a.__class__}`` or ``{a[0]}`` walk Python objects; this never does:
    placeholders are parsed by :class:`string.Formatter` and substituted here by plain key lookup.
    """

    text: str
    pieces: tuple[tuple[str, str | None], ...]

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for _, name in self.pieces if name is not None))

    def render(self, values: Mapping[str, Any]) -> str:
        out = []
        for literal, name in self.pieces:
            out.append(literal)
            if name is None:
                continue
            if name not in values:
                raise FieldError(f"missing (the template uses {{{name}}})", name)
            out.append(template_value(values[name], name))
        return "".join(out)


def template_value(value: Any, field: str) -> str:
    """Strings go in as they are; other JSON values as compact JSON, so nothing renders as a Python repr."""
    if isinstance(value, str):
        return check_encodable(value, field)
    if value is None:
        raise FieldError("is null (the template needs a value)", field)
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (RecursionError, ValueError):
        raise FieldError("cannot be rendered into the template (nested too deeply)", field) from None
    return check_encodable(text, field)


def compile_template(text: str) -> Template:
    """Reject a bad template once, up front, rather than on every line."""
    try:
        text.encode("utf-8")
        parsed = list(string.Formatter().parse(text))
    except UnicodeEncodeError:
        raise UsageError("invalid template: it is not valid UTF-8") from None
    except ValueError as exc:
        raise UsageError(f"invalid template: {exc}") from None
    pieces: list[tuple[str, str | None]] = []
    for literal, name, spec, conversion in parsed:
        if name is not None:
            shown = "{" + name + "}"
            if not name or name.isdigit():
                raise UsageError("invalid template: placeholders need a field name, e.g. {text}")
            if "." in name or "[" in name:
                raise UsageError(
                    f"invalid template: {shown} — only top-level fields are allowed, no attributes or indexes"
                )
            if spec or conversion:
                raise UsageError(f"invalid template: {shown} — format specs and conversions are unsupported")
        pieces.append((literal, name))
    template = Template(text, tuple(pieces))
    if not template.fields:
        raise UsageError("invalid template: no {field} placeholders, so every row would get the same prompt")
    return template


# -- /v1/embeddings bodies ---------------------------------------------------------------------------

MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per request
TOKEN_ID_LIMIT = 2**31 - 1
ENCODING_FORMATS = ("float", "base64")
EMBEDDING_BODY_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})


def embedding_request(body: Mapping[str, Any], prefix: str = "body.") -> dict[str, Any]:
    """An embeddings body as keyword arguments for ``DatasetRow`` (``inputs``, ``encoding_format``, ``dimensions``).

    Every body field is either honoured or refused: a typo or a generation field (``max_tokens``) here is a
    sign the line was meant for another endpoint, and answering it anyway would hide that.
    """
    for key in body:
        if key not in EMBEDDING_BODY_FIELDS:
            accepted = ", ".join(sorted(EMBEDDING_BODY_FIELDS))
            raise FieldError(f"is not an embeddings field (accepted: {accepted})", prefix + str(key))
    if "input" not in body:
        raise FieldError("missing (/v1/embeddings needs input)", prefix + "input")
    out: dict[str, Any] = {"inputs": embedding_inputs(body["input"], prefix + "input")}
    fmt = body.get("encoding_format")
    if fmt is not None:
        if fmt not in ENCODING_FORMATS:
            raise FieldError(f"must be 'float' or 'base64', got {show(fmt)}", prefix + "encoding_format")
        out["encoding_format"] = fmt
    if body.get("dimensions") is not None:
        out["dimensions"] = integer(body["dimensions"], prefix + "dimensions", 1, 65536)
    if body.get("user") is not None:
        text_value(body["user"], prefix + "user")
    return out


def embedding_inputs(value: Any, field: str) -> tuple[str | tuple[int, ...], ...]:
    """``input`` as OpenAI takes it: a string, an array of strings, an array of tokens, or arrays of tokens."""
    if isinstance(value, str):
        return (_embedding_text(value, field),)
    if not isinstance(value, list):
        raise FieldError(f"must be a string, an array of strings or token arrays, got {describe(value)}", field)
    if not value:
        raise FieldError("must not be an empty array", field)
    if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return (_token_ids(value, field),)
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise FieldError(f"has {len(value)} inputs; at most {MAX_EMBEDDING_INPUTS} are allowed", field)
    out: list[str | tuple[int, ...]] = []
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if isinstance(item, str):
            out.append(_embedding_text(item, where))
        elif isinstance(item, list):
            if not item:
                raise FieldError("must not be an empty token array", where)
            out.append(_token_ids(item, where))
        else:
            raise FieldError(f"must be a string or a token array, got {describe(item)}", where)
    return tuple(out)


def _embedding_text(value: str, field: str) -> str:
    if not value:
        raise FieldError("must not be an empty string", field)
    return check_encodable(value, field)


def _token_ids(value: list[Any], field: str) -> tuple[int, ...]:
    for j, token in enumerate(value):
        if isinstance(token, bool) or not isinstance(token, int):
            raise FieldError(f"must be a token id (integer), got {describe(token)}", f"{field}[{j}]")
        if token < 0 or token > TOKEN_ID_LIMIT:
            raise FieldError(f"must be a token id between 0 and {TOKEN_ID_LIMIT}, got {describe(token)}",
                             f"{field}[{j}]")
    return tuple(value)

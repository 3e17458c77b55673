"""``/v1/responses`` lines: the Responses request body checked into chat messages, sampling parameters and
the fields its answer repeats.

Which body fields are honoured, ignored or refused is listed in :mod:`tokenmill.request_contract` (one
place for every endpoint); this module reads the honoured ones. ``input`` (a string, or message, function
call and function call output items) and ``instructions`` become the chat messages the model's template
formats; ``max_output_tokens``, ``temperature``, ``top_p``, ``text.format`` and the tools become the row's
:class:`~tokenmill.rows.SamplingParams`; ``metadata`` and the rest of what a ``Response`` echoes ride in
the row's ``echo``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from tokenmill import structured, tool_calls
from tokenmill.dataset_fields import (
    MAX_TOKENS_LIMIT,
    ROLES,
    FieldError,
    content_text,
    describe,
    integer,
    number,
    show,
    text_value,
)
from tokenmill.request_contract import REFUSED, checked_schema
from tokenmill.rows import RESPONSES
from tokenmill.tools_contract import tool_overrides

_INPUT_PARTS = frozenset({"input_text"})
_ASSISTANT_PARTS = frozenset({"output_text", "input_text"})
_FORMAT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_METADATA_KEYS = 16


def request(body: Mapping[str, Any], prefix: str) -> tuple[tuple[dict[str, str], ...], dict[str, Any], dict[str, Any]]:
    """(messages, SamplingParams overrides, echo) of one Responses body."""
    _refuse(body, prefix)
    overrides: dict[str, Any] = {}
    if body.get("max_output_tokens") is not None:
        overrides["max_tokens"] = integer(body["max_output_tokens"], prefix + "max_output_tokens", 1, MAX_TOKENS_LIMIT)
    if body.get("temperature") is not None:
        overrides["temperature"] = number(body["temperature"], prefix + "temperature", 0.0, 2.0)
    if body.get("top_p") is not None:
        overrides["top_p"] = number(body["top_p"], prefix + "top_p", 0.0, 1.0, low_open=True)
    fmt = _text_format(body.get("text"), prefix + "text")
    if fmt.get("type") == "json_schema":
        overrides["json_schema"] = checked_schema(fmt["schema"], prefix + "text.format.schema")
    elif fmt.get("type") == "json_object":
        overrides["json_schema"] = structured.JSON_OBJECT
    overrides.update(tool_overrides(body, prefix, overrides, flat=True))
    instructions = body.get("instructions")
    if instructions is not None:
        instructions = text_value(instructions, prefix + "instructions")
    messages = _input(body.get("input"), prefix + "input")
    if instructions:
        messages = [{"role": "system", "content": instructions}, *messages]
    spec = tool_calls.spec_of(overrides["tools"]) if "tools" in overrides else None
    echo = {
        "instructions": instructions,
        "metadata": _metadata(body.get("metadata"), prefix + "metadata"),
        "text": {"format": fmt},
        "max_output_tokens": overrides.get("max_tokens"),
        "max_tool_calls": body.get("max_tool_calls"),
    }
    return tool_calls.with_tools(messages, spec), overrides, echo


def _refuse(body: Mapping[str, Any], prefix: str) -> None:
    for key, why in REFUSED[RESPONSES].items():
        value = body.get(key)
        if value is not None and value is not False and value != []:
            raise FieldError(why, prefix + key)
    stream = body.get("stream")
    if stream is not None and stream is not False:
        raise FieldError("streaming is not supported in batch jobs; remove it", prefix + "stream")
    truncation = body.get("truncation")
    if truncation is not None and truncation != "disabled":
        raise FieldError(
            f"only 'disabled' is supported (a request longer than the context fails), got {show(truncation)}",
            prefix + "truncation",
        )


def _text_format(value: Any, where: str) -> dict[str, Any]:
    """``text.format`` as the answer repeats it: text, json_object, or json_schema (flat: name, schema, strict)."""
    if value is None:
        return {"type": "text"}
    if not isinstance(value, dict):
        raise FieldError(f"must be an object with 'format', got {describe(value)}", where)
    for key in value:
        if key == "verbosity" and value[key] is None:
            continue
        if key != "format":
            raise FieldError("is not supported (text.format only)", f"{where}.{show(key, 30)[1:-1]}")
    fmt = value.get("format")
    if fmt is None:
        return {"type": "text"}
    at = f"{where}.format"
    if not isinstance(fmt, dict):
        raise FieldError(f"must be an object with a 'type', got {describe(fmt)}", at)
    kind = fmt.get("type")
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind != "json_schema":
        raise FieldError(f"unsupported type {show(kind)} (text, json_object or json_schema)", f"{at}.type")
    name = text_value(fmt.get("name"), f"{at}.name", allow_empty=False)
    if not _FORMAT_NAME.fullmatch(name):
        raise FieldError(f"{show(name)} is not a format name (a-z, A-Z, 0-9, _ and -, at most 64)", f"{at}.name")
    if "schema" not in fmt:
        raise FieldError("missing", f"{at}.schema")
    out: dict[str, Any] = {"type": "json_schema", "name": name, "schema": fmt["schema"]}
    for key in ("description", "strict"):
        if fmt.get(key) is not None:
            out[key] = fmt[key]
    if "strict" in out and not isinstance(out["strict"], bool):
        raise FieldError(f"must be true or false, got {describe(out['strict'])}", f"{at}.strict")
    if "description" in out:
        text_value(out["description"], f"{at}.description")
    return out


def _metadata(value: Any, where: str) -> dict[str, str] | None:
    """OpenAI's metadata: at most 16 string keys of up to 64 characters, string values of up to 512."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FieldError(f"must be an object of strings, got {describe(value)}", where)
    if len(value) > MAX_METADATA_KEYS:
        raise FieldError(f"has {len(value)} keys; at most {MAX_METADATA_KEYS} are allowed", where)
    for key, item in value.items():
        if len(key) > 64:
            raise FieldError(f"key {show(key)} is longer than 64 characters", where)
        text_value(key, where)
        if not isinstance(item, str) or len(item) > 512:
            at = f"{where}.{show(key, 30)[1:-1]}"
            raise FieldError(f"must be a string of at most 512 characters, got {describe(item)}", at)
    return dict(value)


def _input(value: Any, where: str) -> list[dict[str, str]]:
    """``input`` as chat messages; function calls and their outputs become text turns (tool_calls format)."""
    if value is None:
        raise FieldError("missing (/v1/responses needs input)", where)
    if isinstance(value, str):
        return [{"role": "user", "content": text_value(value, where, allow_empty=False)}]
    if not isinstance(value, list):
        raise FieldError(f"must be a string or an array of input items, got {describe(value)}", where)
    if not value:
        raise FieldError("must not be empty", where)
    out: list[dict[str, str]] = []
    calls: list[tuple[str, str]] = []
    results: list[str] = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise FieldError(f"must be an input item object, got {describe(item)}", at)
        kind = item.get("type", "message")
        if kind != "function_call" and calls:
            out.append({"role": "assistant", "content": tool_calls.assistant_text(None, calls)})
            calls = []
        if kind != "function_call_output" and results:
            out.append({"role": "user", "content": tool_calls.tool_response_text(results)})
            results = []
        if kind == "message":
            out.append(_message(item, at))
        elif kind == "function_call":
            _call_id(item, at)
            name = text_value(item.get("name"), f"{at}.name", allow_empty=False)
            calls.append((name, text_value(item.get("arguments", "{}"), f"{at}.arguments")))
        elif kind == "function_call_output":
            _call_id(item, at)
            if "output" not in item:
                raise FieldError("missing", f"{at}.output")
            results.append(content_text(item["output"], f"{at}.output", _INPUT_PARTS))
        else:
            raise FieldError(
                f"input item type {show(kind)} is not supported (message, function_call, function_call_output)",
                f"{at}.type",
            )
    if calls:
        out.append({"role": "assistant", "content": tool_calls.assistant_text(None, calls)})
    if results:
        out.append({"role": "user", "content": tool_calls.tool_response_text(results)})
    return out


def _message(item: dict[str, Any], at: str) -> dict[str, str]:
    role = item.get("role")
    if role is None:
        raise FieldError("missing", f"{at}.role")
    if not isinstance(role, str) or role not in ROLES:
        raise FieldError(f"unsupported role {show(role)} (user, assistant, system, developer)", f"{at}.role")
    if "content" not in item:
        raise FieldError("missing", f"{at}.content")
    kinds = _ASSISTANT_PARTS if role == "assistant" else _INPUT_PARTS
    return {"role": ROLES[role], "content": content_text(item["content"], f"{at}.content", kinds)}


def _call_id(item: dict[str, Any], at: str) -> None:
    text_value(item.get("call_id"), f"{at}.call_id", allow_empty=False)

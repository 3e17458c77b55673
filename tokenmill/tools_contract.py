"""The request fields of function calling: ``tools``, ``tool_choice``, ``parallel_tool_calls`` (chat and
Responses) and ``max_tool_calls`` (Responses), checked into the :class:`~tokenmill.tool_calls.ToolSpec` a row
stores in ``SamplingParams.tools``.

Chat nests a function (``{"type": "function", "function": {"name", "parameters"}}``), Responses does not
(``{"type": "function", "name", "parameters"}``); both become the same spec. Only function tools exist here:
a built-in tool (web search, file search, code interpreter, computer use …) is a line error naming it. Each
function's ``parameters`` is checked like a ``json_schema`` response format, since decoding enforces it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenmill import structured, tool_calls
from tokenmill.dataset_fields import FieldError, describe, integer, show, text_value
from tokenmill.request_contract import checked_schema
from tokenmill.tool_calls import AUTO, FUNCTION, NONE, REQUIRED, Tool, ToolSpec

MAX_TOOLS = 128  # OpenAI's limit
MAX_TOOL_CALLS = 128
NO_PARAMETERS = '{"type":"object","properties":{},"additionalProperties":false}'


def tool_overrides(src: Mapping[str, Any], prefix: str, constraint: Mapping[str, Any], *, flat: bool) -> dict[str, Any]:
    """``{"tools": spec text}`` for a line that offers tools, ``{}`` for one that does not.

    ``constraint`` is what the line's response format asks (a JSON answer is then the text branch of
    ``auto``); ``flat`` selects the Responses shapes.
    """
    tools = _tools(src.get("tools"), prefix + "tools", flat=flat)
    choice, name = _choice(src.get("tool_choice"), prefix + "tool_choice", tools, flat=flat)
    parallel = src.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise FieldError(f"must be true or false, got {describe(parallel)}", prefix + "parallel_tool_calls")
    max_calls = src.get("max_tool_calls")
    if max_calls is not None:
        max_calls = integer(max_calls, prefix + "max_tool_calls", 1, MAX_TOOL_CALLS)
    if not tools:
        return {}
    if "grammar" in constraint:
        raise FieldError("cannot be combined with a grammar", prefix + "tools")
    if choice != NONE and src.get("stop"):
        raise FieldError("cannot be combined with tools: a stop string inside a call would cut it", prefix + "stop")
    spec = ToolSpec(tuple(tools), choice, name, parallel is not False, max_calls)
    text = spec.to_text()
    try:
        tool_calls.row_grammar(constraint.get("json_schema"), text)
    except structured.SchemaError as exc:
        raise FieldError(f"cannot be enforced: {exc.message}", prefix + "tools") from None
    return {"tools": text}


def _tools(value: Any, where: str, *, flat: bool) -> list[Tool]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise FieldError(f"must be an array of tools, got {describe(value)}", where)
    if len(value) > MAX_TOOLS:
        raise FieldError(f"has {len(value)} tools; at most {MAX_TOOLS} are allowed", where)
    out: list[Tool] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        tool = _tool(item, f"{where}[{i}]", flat=flat)
        if tool.name in seen:
            raise FieldError(f"function name {show(tool.name)} is used twice", f"{where}[{i}]")
        seen.add(tool.name)
        out.append(tool)
    return out


def _tool(item: Any, where: str, *, flat: bool) -> Tool:
    if not isinstance(item, dict):
        raise FieldError(f"must be a tool object, got {describe(item)}", where)
    kind = item.get("type")
    if kind != "function":
        what = "built-in tool" if flat else "tool type"
        raise FieldError(f"{what} {show(kind)} is not supported (function tools only)", f"{where}.type")
    spec: Any = item
    at = where
    if not flat:
        spec, at = item.get("function"), f"{where}.function"
        if not isinstance(spec, dict):
            raise FieldError(f"must be an object with 'name' and 'parameters', got {describe(spec)}", at)
    name = text_value(spec.get("name"), f"{at}.name", allow_empty=False)
    if not tool_calls.NAME.fullmatch(name):
        raise FieldError(f"{show(name)} is not a function name (a-z, A-Z, 0-9, _ and -, at most 64)", f"{at}.name")
    description = spec.get("description")
    if description is not None:
        description = text_value(description, f"{at}.description")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise FieldError(f"must be true or false, got {describe(strict)}", f"{at}.strict")
    params = spec.get("parameters")
    schema = NO_PARAMETERS if params is None else checked_schema(params, f"{at}.parameters")
    if params is not None and not (isinstance(params, dict) and params.get("type") == "object"):
        raise FieldError("must be a JSON schema of type 'object' (the arguments are an object)", f"{at}.parameters")
    return Tool(name, schema, description, strict)


def _choice(value: Any, where: str, tools: list[Tool], *, flat: bool) -> tuple[str, str | None]:
    """``tool_choice`` as (choice, function name): auto when tools are offered and it is left out."""
    if value is None:
        return (AUTO if tools else NONE), None
    if isinstance(value, str):
        if value not in (AUTO, NONE, REQUIRED):
            raise FieldError(f"must be 'auto', 'none', 'required' or a function, got {show(value)}", where)
        if value == REQUIRED and not tools:
            raise FieldError("'required' needs tools to call", where)
        return value, None
    if not isinstance(value, dict):
        raise FieldError(f"must be a string or an object naming a function, got {describe(value)}", where)
    kind = value.get("type")
    if kind != "function":
        raise FieldError(f"tool choice type {show(kind)} is not supported (a function, or auto/none/required)",
                         f"{where}.type")  # fmt: skip
    holder, at = (value, where) if flat else (value.get("function"), f"{where}.function")
    if not isinstance(holder, dict):
        raise FieldError(f"must be an object with 'name', got {describe(holder)}", at)
    name = text_value(holder.get("name"), f"{at}.name", allow_empty=False)
    if name not in {t.name for t in tools}:
        raise FieldError(f"names {show(name)}, which is not one of the tools", f"{at}.name")
    return FUNCTION, name

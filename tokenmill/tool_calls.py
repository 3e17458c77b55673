"""Function calling: the tools a row offers, how the prompt lists them, the grammar a call is decoded under,
and how the generated text becomes ``tool_calls``.

One generic format serves every model (the one Hermes-style and Qwen 2.5 templates use): the tools are listed
as JSON in the system message, and a call is written ::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Earlier calls and tool results in a conversation are rendered the same way (results as ``<tool_response>`` in
a user turn), so the prompt is plain chat messages and the engine formats it with the model's own template.
When a call is wanted (``tool_choice`` "required", a named function, or "auto" when the model starts one),
decoding runs under an llguidance grammar: the name is one of the tools' and the arguments are JSON valid
against that tool's ``parameters``, every keyword enforced as :mod:`tokenmill.structured` enforces it.

This module is below the engines and the output writer: both read a row's :class:`ToolSpec` from the
compact JSON text ``SamplingParams.tools`` stores.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from tokenmill import structured

AUTO, NONE, REQUIRED, FUNCTION = "auto", "none", "required", "function"
OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names; safe inside a grammar literal
_CALL = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.S)


@dataclass(frozen=True)
class Tool:
    """A function tool; ``parameters`` is its JSON schema as compact text (checked like a json_schema row's)."""

    name: str
    parameters: str
    description: str | None = None
    strict: bool | None = None


@dataclass(frozen=True)
class ToolSpec:
    """What a row offers and asks: its tools, ``choice`` (auto, none, required or function with ``name``),
    ``parallel`` (several calls in one answer, or at most one) and ``max_calls`` (Responses' max_tool_calls)."""

    tools: tuple[Tool, ...]
    choice: str = AUTO
    name: str | None = None
    parallel: bool = True
    max_calls: int | None = None

    def to_text(self) -> str:
        data = {
            "tools": [
                {"name": t.name, "parameters": json.loads(t.parameters), "description": t.description,
                 "strict": t.strict}
                for t in self.tools
            ],
            "choice": self.choice, "name": self.name, "parallel": self.parallel, "max_calls": self.max_calls,
        }  # fmt: skip
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))

    @property
    def calls_allowed(self) -> int | None:
        """At most this many calls in one answer (None: no limit)."""
        limit = 1 if not self.parallel else None
        if self.max_calls is not None:
            limit = min(limit or self.max_calls, self.max_calls)
        return limit

    @property
    def offered(self) -> tuple[Tool, ...]:
        """The tools a call may name: all of them, or the one ``tool_choice`` names."""
        if self.choice == FUNCTION:
            return tuple(t for t in self.tools if t.name == self.name)
        return self.tools if self.choice != NONE else ()


@lru_cache(maxsize=256)
def spec_of(text: str) -> ToolSpec:
    """The spec a row stores (``SamplingParams.tools``), parsed once per distinct text."""
    data = json.loads(text)
    tools = tuple(
        Tool(t["name"], json.dumps(t["parameters"], ensure_ascii=False, separators=(",", ":")),
             t.get("description"), t.get("strict"))
        for t in data["tools"]
    )  # fmt: skip
    return ToolSpec(tools, data["choice"], data.get("name"), data["parallel"], data.get("max_calls"))


# -- the prompt ----------------------------------------------------------------------------------------


def tools_block(spec: ToolSpec) -> str:
    """The system-prompt text that lists the tools and says how to call them."""
    listed = "\n".join(
        json.dumps({"type": "function", "function": _function_json(t)}, ensure_ascii=False) for t in spec.tools
    )
    lines = [
        "# Tools",
        "",
        "You may call one or more functions to assist with the user query.",
        "",
        "You are provided with function signatures within <tools></tools> XML tags:",
        f"<tools>\n{listed}\n</tools>",
        "",
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:",
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>',
    ]
    if spec.choice == REQUIRED:
        lines.append("\nYou must call at least one function.")
    elif spec.choice == FUNCTION:
        lines.append(f"\nYou must call the function {spec.name}.")
    if spec.calls_allowed == 1:
        lines.append("Call at most one function.")
    return "\n".join(lines)


def _function_json(tool: Tool) -> dict[str, Any]:
    out: dict[str, Any] = {"name": tool.name}
    if tool.description:
        out["description"] = tool.description
    out["parameters"] = json.loads(tool.parameters)
    return out


def with_tools(messages: Sequence[dict[str, str]], spec: ToolSpec | None) -> tuple[dict[str, str], ...]:
    """The messages with the tools listed at the end of the system message (one is added if there is none).

    With ``tool_choice: "none"`` the tools are left out: the answer is text, and a model shown tools might
    write a call as text.
    """
    if spec is None or spec.choice == NONE or not spec.tools:
        return tuple(messages)
    block = tools_block(spec)
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        content = f"{first['content']}\n\n{block}" if first["content"] else block
        return ({"role": "system", "content": content}, *messages[1:])
    return ({"role": "system", "content": block}, *messages)


def call_text(name: str, arguments: str) -> str:
    """One call as the model writes it (``arguments`` is JSON text; it is parsed so the layout is the model's)."""
    try:
        args: Any = json.loads(arguments)
    except (ValueError, RecursionError):
        args = arguments  # written as a JSON string when it is not JSON, rather than dropped
    body = json.dumps({"name": name, "arguments": args}, ensure_ascii=False)
    return f"{OPEN}\n{body}\n{CLOSE}"


def assistant_text(content: str | None, calls: Iterable[tuple[str, str]]) -> str:
    """An earlier assistant turn that made calls, as its text."""
    parts = [content] if content else []
    parts += [call_text(name, arguments) for name, arguments in calls]
    return "\n".join(parts)


def tool_response_text(outputs: Iterable[str]) -> str:
    """Consecutive tool results as one user turn (as Qwen 2.5's template renders them)."""
    return "\n".join(f"<tool_response>\n{output}\n</tool_response>" for output in outputs)


# -- decoding ------------------------------------------------------------------------------------------


def grammar(spec: ToolSpec, json_schema: str | None) -> str | None:
    """The llguidance (lark) grammar a row decodes under; None when nothing constrains it (``none``, or
    ``auto`` with no tools). ``json_schema`` is what a text answer must be, when the row asks for JSON."""
    offered = spec.offered
    if not offered:
        return None
    rules = ["%llguidance {}"]
    if spec.choice == AUTO:
        rules.append("start: calls | answer")
        if json_schema is None:
            rules.append(r"answer: TEXT")
            rules.append(rf"TEXT: /(?s:.*)/ & ~/{re.escape(OPEN)}(?s:.*)/")
        else:
            rules.append(f"answer: %json {structured.inline_schema(json_schema)}")
    else:
        rules.append("start: calls")
    limit = spec.calls_allowed
    more = "" if limit == 1 else (f'("\\n" call){{0,{limit - 1}}}' if limit is not None else '("\\n" call)*')
    rules.append(f"calls: call {more}".rstrip())
    rules.append(f'call: "{OPEN}\\n" body "\\n{CLOSE}"')
    rules.append("body: " + " | ".join(f"fn{i}" for i in range(len(offered))))
    for i, tool in enumerate(offered):
        rules.append(f'fn{i}: "{{\\"name\\": \\"{tool.name}\\", \\"arguments\\": " args{i} "}}"')
        rules.append(f"args{i}: %json {structured.inline_schema(tool.parameters)}")
    return "\n".join(rules) + "\n"


def row_grammar(json_schema: str | None, tools: str | None) -> str | None:
    """The llguidance grammar of a row's decoding from what ``SamplingParams`` stores; None for a free row.
    Raises :class:`structured.SchemaError` when it cannot be compiled."""
    if tools is not None:
        compiled = _compiled(json_schema, tools)
        if isinstance(compiled, structured.SchemaError):
            raise structured.SchemaError(compiled.message, compiled.path)
        if compiled is not None:
            return compiled
    return structured.grammar(json_schema) if json_schema is not None else None


@lru_cache(maxsize=256)
def _compiled(json_schema: str | None, tools: str) -> str | structured.SchemaError | None:
    from llguidance import LLMatcher

    try:
        lark = grammar(spec_of(tools), json_schema)
    except structured.SchemaError as exc:
        return exc
    if lark is None:
        return None
    try:
        compiled = LLMatcher.grammar_from_lark(lark)
        failed, messages = LLMatcher.validate_grammar_with_warnings(compiled)
    except (ValueError, RuntimeError) as exc:
        return structured.SchemaError(" ".join(str(exc).split())[:200])
    if failed:
        return structured.SchemaError(" ".join((messages[0] if messages else "cannot be compiled").split())[:200])
    return compiled


# -- the answer ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # JSON text


def parse(text: str, spec: ToolSpec) -> tuple[list[Call], str] | None:
    """The calls an answer makes and what follows the last one, or None when the answer is text.

    Decoding put every finished call in the layout above, so a call reads back exactly. What follows the
    calls is empty for an answer that stopped, and the unfinished call for one cut by ``max_tokens``.
    """
    if not spec.offered or not text.startswith(OPEN):
        return None
    calls: list[Call] = []
    end = 0
    for found in _CALL.finditer(text):
        if text[end : found.start()].strip():
            break
        try:
            data = json.loads(found.group(1))
        except (ValueError, RecursionError):
            break
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or "arguments" not in data:
            break
        calls.append(Call(data["name"], json.dumps(data["arguments"], ensure_ascii=False)))
        end = found.end()
    rest = text[end:].lstrip("\n")
    return (calls, rest) if calls else None


def call_id(request_id: str, choice: int, index: int) -> str:
    """A call's id: stable for one answer (a cached copy keeps its original ids) and unique across answers."""
    digest = hashlib.sha256(f"{request_id}:{choice}:{index}".encode()).hexdigest()[:24]
    return f"call_{digest}"

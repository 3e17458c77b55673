"""The OpenAI request contract: which body fields tokenmill honours, which it ignores, and the rest.

A batch system whose answers look right while it ignored what was asked is worse than one that refuses,
so every field of a request is in exactly one of three sets: honoured (validated here and carried in
:class:`~tokenmill.rows.SamplingParams`), harmless and ignored (:data:`IGNORED`), or unknown — a line
error naming the field, or with ``--allow-unknown-fields`` one warning per field name (:class:`Ignored`).
docs/requests.md lists the same sets, field by field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tokenmill import gbnf, structured
from tokenmill.dataset_fields import FieldError, describe, integer, number, show, text_value
from tokenmill.rows import CHAT, COMPLETIONS, RESPONSES

SAMPLING = frozenset(
    {
        "model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "presence_penalty",
        "frequency_penalty", "logit_bias", "top_k", "min_p", "repetition_penalty", "repeat_penalty",
        "response_format", "grammar", "logprobs", "max_completion_tokens",
    }
)  # fmt: skip
HONOURED = {
    CHAT: SAMPLING | {"messages", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls"},
    COMPLETIONS: SAMPLING | {"prompt"},
    RESPONSES: frozenset(
        {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "text", "tools",
         "tool_choice", "parallel_tool_calls", "max_tool_calls", "metadata", "stream", "truncation"}
    ),
}  # fmt: skip
_IGNORED_CHAT = frozenset({"user", "metadata", "store", "service_tier", "stream_options"})
IGNORED = {
    CHAT: _IGNORED_CHAT,
    COMPLETIONS: _IGNORED_CHAT | {"parallel_tool_calls"},  # no tools on completions: it asks nothing
    RESPONSES: frozenset(
        {"user", "store", "service_tier", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
         "prompt_cache_options", "stream_options"}
    ),
}  # fmt: skip
# Responses fields that would change the answer and cannot be honoured in a batch job: a line error whatever
# --allow-unknown-fields says, unless null (or false, for the flags), which asks for nothing.
REFUSED = {
    RESPONSES: {
        "previous_response_id": "earlier responses are not stored; send the conversation as input items",
        "conversation": "conversations are not stored; send the conversation as input items",
        "background": "a batch job already runs in the background; remove it",
        "prompt": "stored prompt templates are not served; send the prompt as input",
        "reasoning": "reasoning options are not supported by the local models",
        "include": "extra output data (logprobs, reasoning, sources) is not produced",
        "top_logprobs": "logprobs are not produced for /v1/responses lines",
        "context_management": "context management is not supported",
        "background_options": "a batch job already runs in the background; remove it",
        "moderation": "moderation is not supported",
        "image": "image generation is not supported",
        "access_programs": "not supported",
    },
}
ROW_KEYS = frozenset({"id", "custom_id"})  # a plain (non-batch) line also carries its id
_LEGACY_FUNCTIONS = frozenset({"functions", "function_call"})
MAX_LOGIT_BIAS = 1024
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
MAX_N = 16
MAX_GRAMMAR_CHARS = gbnf.MAX_GRAMMAR_CHARS
MAX_SCHEMA_CHARS = 64 * 1024  # a response_format schema, as compact JSON


@dataclass
class Ignored:
    """Unknown fields let through by ``--allow-unknown-fields``: per field name, lines and the first line.

    ``total`` counts lines, not field occurrences: the run summary says "N names on M lines", and a line
    carrying two unknown fields is one line. Lines arrive in order, so remembering the last one is enough.
    """

    lines: dict[str, int] = field(default_factory=dict)
    first: dict[str, int] = field(default_factory=dict)
    total: int = 0
    _last_line: int | None = None

    def add(self, name: str, line: int) -> None:
        self.lines[name] = self.lines.get(name, 0) + 1
        self.first.setdefault(name, line)
        if line != self._last_line:
            self.total += 1
            self._last_line = line

    def reset(self) -> None:
        """Forget what an earlier pass over the file counted (an ingest starts over)."""
        self.lines.clear()
        self.first.clear()
        self.total, self._last_line = 0, None

    def warnings(self) -> list[str]:
        """One line per field name, for the console and the run summary."""
        return [
            f"ignored unknown field {show(name, 40)} on {n} line{'s' * (n != 1)} (first on line {self.first[name]})"
            for name, n in sorted(self.lines.items())
        ]


@dataclass(frozen=True)
class LineModel:
    """The job's model against the ``model`` a line names: one job runs one model.

    ``family_of`` maps a name to its catalog family, None for names outside the catalog (``gpt-4o-mini``
    in a file written for OpenAI), which are accepted and ignored. ``source`` says where the job's model
    came from, for the message: ``--model``, or the line that named it first.
    """

    family_of: Callable[[str], str | None]
    family: str
    source: str

    def check(self, src: Mapping[str, Any], prefix: str) -> None:
        value = src.get("model")
        if value is None:
            return
        name = text_value(value, prefix + "model")
        family = self.family_of(name)
        if family is not None and family != self.family:
            raise FieldError(
                f"names {show(name)} but the job runs {self.family} ({self.source}); one job runs one model",
                prefix + "model",
            )


def unknown_fields(src: Mapping[str, Any], endpoint: str, prefix: str, *, plain: bool) -> list[str]:
    """Field names of ``src`` that tokenmill neither honours nor knows to be harmless, in line order."""
    known = HONOURED[endpoint] | IGNORED[endpoint] | set(REFUSED.get(endpoint, {})) | (ROW_KEYS if plain else set())
    return [key for key in src if key not in known]  # stream_options rides on stream, refused when true


def unknown_error(key: str, prefix: str) -> FieldError:
    if key in _LEGACY_FUNCTIONS:
        why = "the legacy functions API is not supported (use tools and tool_choice)"
    elif key == "echo" or key == "suffix" or key == "best_of":
        why = "not supported for completions"
    else:
        why = "is not a request field tokenmill knows"
    return FieldError(f"{why}; remove it, or pass --allow-unknown-fields to ignore it", prefix + key)


def extra_overrides(src: Mapping[str, Any], endpoint: str, prefix: str) -> dict[str, Any]:
    """The SamplingParams fields beyond the basic set that a line sets (null means unset)."""
    out: dict[str, Any] = {}
    for key in ("presence_penalty", "frequency_penalty"):
        if src.get(key) is not None:
            out[key] = number(src[key], prefix + key, -2.0, 2.0)
    penalty = _repetition_penalty(src, prefix)
    if penalty is not None:
        out["repetition_penalty"] = penalty
    if src.get("top_k") is not None:
        top_k = integer(src["top_k"], prefix + "top_k", -1, 2**31 - 1)
        if top_k > 0:
            out["top_k"] = top_k
    if src.get("min_p") is not None:
        out["min_p"] = number(src["min_p"], prefix + "min_p", 0.0, 1.0)
    if src.get("logit_bias") is not None:
        out["logit_bias"] = _logit_bias(src["logit_bias"], prefix + "logit_bias")
    logprobs = _logprobs(src, endpoint, prefix)
    if logprobs is not None:
        out["logprobs"] = logprobs
    out.update(constraint_of(src, prefix))
    if src.get("n") is not None:
        out["n"] = integer(src["n"], prefix + "n", 1, MAX_N)
    return {k: v for k, v in out.items() if not (k == "n" and v == 1)}


def _repetition_penalty(src: Mapping[str, Any], prefix: str) -> float | None:
    value = None
    for key in ("repetition_penalty", "repeat_penalty"):
        if src.get(key) is not None:
            got = number(src[key], prefix + key, 0.0, 10.0, low_open=True)
            if value is not None and got != value:
                raise FieldError(f"is {got:g} but repetition_penalty is {value:g}; set one of them", prefix + key)
            value = got
    return None if value == 1.0 else value


def _logit_bias(value: Any, where: str) -> tuple[tuple[int, float], ...]:
    """OpenAI's map of token id (as a string) to a bias in -100..100; the ids are the model's own."""
    if not isinstance(value, dict):
        raise FieldError(f"must be an object mapping token ids to biases, got {describe(value)}", where)
    if len(value) > MAX_LOGIT_BIAS:
        raise FieldError(f"has {len(value)} entries; at most {MAX_LOGIT_BIAS} are allowed", where)
    out: dict[int, float] = {}
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit()) or len(key) > 9:
            raise FieldError(f"key {show(key)} is not a token id (a non-negative integer)", where)
        out[int(key)] = number(bias, f"{where}.{key}", -100.0, 100.0)
    return tuple(sorted(out.items()))


def _logprobs(src: Mapping[str, Any], endpoint: str, prefix: str) -> int | None:
    """Chat: ``logprobs: true`` plus ``top_logprobs`` 0-20. Completions: ``logprobs: k`` 0-5."""
    value = src.get("logprobs")
    if endpoint != CHAT:
        if value is None:
            return None
        return integer(value, prefix + "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    top = src.get("top_logprobs")
    if value is not None and not isinstance(value, bool):
        raise FieldError(f"must be true or false, got {describe(value)}", prefix + "logprobs")
    if top is not None:
        count = integer(top, prefix + "top_logprobs", 0, MAX_TOP_LOGPROBS)
        if value is not True:
            raise FieldError("needs logprobs: true", prefix + "top_logprobs")
        return count
    return 0 if value else None


def constraint_of(src: Mapping[str, Any], prefix: str) -> dict[str, str]:
    """What constrains a line's decoding: ``{"json_schema": …}`` from ``response_format``, ``{"grammar": …}``
    from tokenmill's own GBNF field, or nothing; a line error when it cannot be enforced."""
    fmt, own = src.get("response_format"), src.get("grammar")
    schema = response_format_schema(fmt, prefix + "response_format") if fmt is not None else None
    if schema is not None and own is not None:
        raise FieldError("set either grammar or a json response_format, not both", prefix + "grammar")
    if schema is not None:
        if src.get("stop"):
            raise FieldError(
                "cannot be combined with a JSON response_format: a stop string inside the JSON would cut it",
                prefix + "stop",
            )
        return {"json_schema": schema}
    if own is None:
        return {}
    if isinstance(own, str) and len(own) > MAX_GRAMMAR_CHARS:
        raise FieldError(f"is longer than {MAX_GRAMMAR_CHARS // 1024} KiB", prefix + "grammar")
    text = text_value(own, prefix + "grammar", allow_empty=False)
    try:
        gbnf.check_grammar(text)
    except gbnf.GrammarError as exc:
        raise FieldError(f"cannot be compiled: {exc}", prefix + "grammar") from None
    return {"grammar": text}


def response_format_schema(fmt: Any, where: str) -> str | None:
    """The stored JSON schema a ``response_format`` asks for (None for text); refused naming the keyword
    decoding could not enforce, checked by the compiler the worker decodes with."""
    if not isinstance(fmt, dict):
        raise FieldError(f"must be an object with a 'type', got {describe(fmt)}", where)
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = fmt.get("schema")
        return structured.JSON_OBJECT if schema is None else checked_schema(schema, f"{where}.schema")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise FieldError(
                f"must be an object with 'name' and 'schema', got {describe(spec)}", f"{where}.json_schema"
            )
        if "schema" not in spec:
            raise FieldError("missing", f"{where}.json_schema.schema")
        return checked_schema(spec["schema"], f"{where}.json_schema.schema")
    raise FieldError(f"unsupported type {show(kind)} (text, json_object or json_schema)", f"{where}.type")


def checked_schema(schema: Any, where: str) -> str:
    if not isinstance(schema, dict):
        raise FieldError(f"must be a JSON schema object, got {describe(schema)}", where)
    try:
        size = len(json.dumps(schema, ensure_ascii=False))
    except (RecursionError, ValueError):
        raise FieldError("cannot be compiled: the schema is nested too deeply", where) from None
    if size > MAX_SCHEMA_CHARS:
        raise FieldError(f"is longer than {MAX_SCHEMA_CHARS // 1024} KiB as JSON", where)
    try:
        return structured.check(schema)
    except structured.SchemaError as exc:
        raise FieldError(exc.message, where + "".join(_step(key) for key in exc.path)) from None


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_$-]{1,60}")


def _step(key: str) -> str:
    """One key of a path inside a schema, as the field name shows it: .properties.name, or ['odd key']."""
    return f".{key}" if _PLAIN_KEY.fullmatch(key) else f"[{show(key)}]"

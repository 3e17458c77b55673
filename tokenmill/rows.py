"""The shared vocabulary of requests: a dataset row and its sampling parameters.

Bottom layer: the reader, the store, the cache, the output writer and the workers all speak in these
types, so they live below every one of them (see docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"
GENERATION_ENDPOINTS = frozenset({CHAT, COMPLETIONS, RESPONSES})
MESSAGE_ENDPOINTS = frozenset({CHAT, RESPONSES})  # rows whose prompt is chat messages

EmbeddingInput = str | tuple[int, ...]  # text, or token ids sent as they are


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # The rest of the OpenAI contract (see README "Request fields"). Stored only when set, so payloads
    # and cache keys written before these existed load and hash exactly as they did.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # llama.cpp/vLLM multiplicative penalty; 1.0 is off
    top_k: int = 0  # 0 is off
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) sorted by token id
    logprobs: int | None = None  # alternatives per token to report; None: no logprobs
    grammar: str | None = None  # GBNF constraining decoding (the `grammar` field), run by llama.cpp
    n: int = 1
    json_schema: str | None = None  # compact JSON schema constraining decoding (see tokenmill.structured)
    tools: str | None = None  # function tools and tool_choice, as tokenmill.tool_calls.ToolSpec stores them

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _ALWAYS_STORED or value != f.default:
                out[f.name] = _jsonable(value)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SamplingParams:
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = data.get(f.name)
            if value is None:
                continue
            if isinstance(f.default, tuple):
                value = _tuples(value)
            elif isinstance(f.default, float) and isinstance(value, int):
                value = float(value)  # JSON keeps 0 and 0.0 apart; the params (and their hash) must not
            values[f.name] = value
        return cls(**values)


# Stored whatever their value: every payload written so far has them, and a cache key is the payload's hash.
_ALWAYS_STORED = frozenset({"max_tokens", "temperature", "top_p", "stop", "seed"})


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple) else value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


@dataclass(frozen=True)
class DatasetRow:
    """One request. ``line`` is the 1-based line in the source file; ``custom_id`` is unique per job."""

    line: int
    custom_id: str
    endpoint: str  # CHAT, COMPLETIONS, RESPONSES or EMBEDDINGS
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    source: str | None = None  # file name a document row came from
    inputs: tuple[EmbeddingInput, ...] | None = None  # EMBEDDINGS rows: one vector per input
    encoding_format: str = "float"  # EMBEDDINGS rows: "float" or "base64"
    dimensions: int | None = None  # EMBEDDINGS rows: the size asked for, None for the model's own
    echo: dict[str, Any] | None = None  # RESPONSES rows: request fields the body repeats (instructions, metadata…)

    @property
    def prompt_chars(self) -> int:
        """Characters of prompt text: stored per row at submit, it sizes chunks and lets an engine refuse a
        row too long for its context (tokens >= bytes / longest token >= chars / longest token) before
        tokenizing it."""
        return len(self.prompt or "") + sum(len(m.get("content", "")) for m in self.messages or ())

    def to_payload(self) -> dict[str, Any]:
        """The JSON stored for this row; workers rebuild the row from it, never from the file."""
        payload: dict[str, Any] = {
            "endpoint": self.endpoint,
            "messages": list(self.messages) if self.messages is not None else None,
            "prompt": self.prompt,
            "params": self.params.to_json(),
            "source": self.source,
        }
        if self.inputs is not None:  # only embeddings rows carry these, so generation payloads keep their shape
            payload["inputs"] = [x if isinstance(x, str) else list(x) for x in self.inputs]
            payload["encoding_format"] = self.encoding_format
            payload["dimensions"] = self.dimensions
        if self.echo is not None:  # what a Responses body repeats is part of its answer, and of its cache key
            payload["echo"] = self.echo
        return payload

    @classmethod
    def from_payload(cls, line: int, custom_id: str, payload: dict[str, Any]) -> DatasetRow:
        messages = payload.get("messages")
        inputs = payload.get("inputs")
        return cls(
            line=line,
            custom_id=custom_id,
            endpoint=payload["endpoint"],
            messages=tuple(messages) if messages is not None else None,
            prompt=payload.get("prompt"),
            params=SamplingParams.from_json(payload["params"]),
            source=payload.get("source"),
            inputs=tuple(x if isinstance(x, str) else tuple(x) for x in inputs) if inputs is not None else None,
            encoding_format=payload.get("encoding_format") or "float",
            dimensions=payload.get("dimensions"),
            echo=payload.get("echo"),
        )

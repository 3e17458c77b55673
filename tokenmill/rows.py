"""The shared vocabulary of requests: a dataset row and its sampling parameters.

Bottom layer: the reader, the store, the cache, the output writer and the workers all speak in these
types, so they live below every one of them (see docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
GENERATION_ENDPOINTS = frozenset({CHAT, COMPLETIONS})

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
    grammar: str | None = None  # GBNF constraining decoding (from response_format or `grammar`)
    n: int = 1

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": list(self.stop),
            "seed": self.seed,
        }
        for name, default in _EXTRA_DEFAULTS.items():
            value = getattr(self, name)
            if value != default:
                out[name] = [list(pair) for pair in value] if name == "logit_bias" else value
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SamplingParams:
        extras = {k: data[k] for k in _EXTRA_DEFAULTS if data.get(k) is not None}
        if "logit_bias" in extras:
            extras["logit_bias"] = tuple((int(t), float(b)) for t, b in extras["logit_bias"])
        return cls(
            max_tokens=int(data["max_tokens"]),
            temperature=float(data["temperature"]),
            top_p=float(data["top_p"]),
            stop=tuple(data.get("stop") or ()),
            seed=data.get("seed"),
            **extras,
        )


_EXTRA_DEFAULTS: dict[str, Any] = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "logit_bias": (),
    "logprobs": None,
    "grammar": None,
    "n": 1,
}


@dataclass(frozen=True)
class DatasetRow:
    """One request. ``line`` is the 1-based line in the source file; ``custom_id`` is unique per job."""

    line: int
    custom_id: str
    endpoint: str  # CHAT, COMPLETIONS or EMBEDDINGS
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    source: str | None = None  # file name a document row came from
    inputs: tuple[EmbeddingInput, ...] | None = None  # EMBEDDINGS rows: one vector per input
    encoding_format: str = "float"  # EMBEDDINGS rows: "float" or "base64"
    dimensions: int | None = None  # EMBEDDINGS rows: the size asked for, None for the model's own

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
        )

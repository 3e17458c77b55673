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

    def to_json(self) -> dict[str, Any]:
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": list(self.stop),
            "seed": self.seed,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SamplingParams:
        return cls(
            max_tokens=int(data["max_tokens"]),
            temperature=float(data["temperature"]),
            top_p=float(data["top_p"]),
            stop=tuple(data.get("stop") or ()),
            seed=data.get("seed"),
        )


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

"""What a worker asks of an inference engine.

Bottom layer: the worker runtime drives an engine through this Protocol and the output writer turns a
:class:`Generation` into an OpenAI body, so neither depends on a backend. The backends are named in
:mod:`tokenmill.engines` (docs/architecture.md, "Adding an engine").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tokenmill.rows import DatasetRow


@dataclass
class TokenLogprob:
    """One generated token's log-probability and the best alternatives, as token ids (the output layer
    spells them), from the log-softmax of the model's logits at that step."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    piece: bytes = b""
    top_pieces: list[bytes] = field(default_factory=list)


@dataclass
class Generation:
    """One finished sequence with the timings a person compares across runs (Ollama/llama-server names)."""

    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0
    prompt_eval_ms: float = 0.0
    ttft_ms: float = 0.0
    eval_ms: float = 0.0
    total_ms: float = 0.0
    token_ms: list[float] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # only when the row asked for them
    choices: list[Generation] | None = None  # n > 1: every choice, in order (this one's text is choice 0)

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / (self.eval_ms / 1000.0) if self.eval_ms > 0 else 0.0


OnDone = Callable[[DatasetRow, "Generation | Exception"], None]


class Engine(Protocol):
    """A loaded model that turns dataset rows into generations.

    ``generate`` calls ``on_done`` once per row, in completion order (batched engines finish rows out of
    order). A row that cannot be served (too long for the context, sampling failure) is reported as an
    exception for that row only; the engine keeps going. ``should_stop`` is polled between decode steps so
    a cancelled job or a lost lease stops work at the next row boundary.
    """

    variant: str
    n_ctx: int
    load_ms: float

    def generate(self, rows: Sequence[DatasetRow], on_done: OnDone, should_stop: Callable[[], bool]) -> None: ...

    def close(self) -> None: ...

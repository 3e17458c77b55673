"""What a worker asks of an inference engine.

Bottom layer: the worker runtime drives an engine through this Protocol and the output writer turns a
:class:`Generation` into an OpenAI body, so neither depends on a backend. The backends are named in
:mod:`tokenmill.engines` (docs/architecture.md, "Adding an engine").
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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
    def reused_prompt_tokens(self) -> int:
        """Prompt tokens served from a reused prefix, clamped to the prompt (an engine's count is trusted
        no further than that)."""
        return min(max(self.cached_prompt_tokens, 0), self.prompt_tokens)

    @property
    def evaluated_prompt_tokens(self) -> int:
        """Prompt tokens actually evaluated, the ones ``prompt_eval_ms`` covers; llama-server and Ollama
        count these, so prompt throughput is not inflated by a prefix-cache hit."""
        return self.prompt_tokens - self.reused_prompt_tokens

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / (self.eval_ms / 1000.0) if self.eval_ms > 0 else 0.0


@dataclass
class EmbeddingResult(Generation):
    """The vectors of one embeddings row, one per input in input order, L2-normalised.

    A :class:`Generation` so the worker counts, times and stores it like any row; ``prompt_tokens`` counts
    every input's tokens and ``text``/``completion_tokens`` stay empty.
    """

    vectors: list[list[float]] = field(default_factory=list)


OnDone = Callable[[DatasetRow, "Generation | Exception"], None]

Refill = Callable[[bool], "Sequence[DatasetRow] | None"]
"""More rows for a running ``generate``: ``refill(wait)`` returns rows to admit, ``[]`` for none yet (only
when ``wait`` is False), or None once no more will come. The worker hands over the next chunk's rows this
way while the current one drains, so the engine's slots never empty at a chunk boundary."""


class RowQueue:
    """Rows waiting for a slot, topped up from a :data:`Refill` whenever fewer than ``low_water`` wait.

    ``expand`` maps rows as they arrive (an engine turns an n > 1 row into its sibling sequences there).
    :meth:`top_up` with ``idle`` (nothing in flight) blocks until rows come or the source is exhausted,
    so an engine loop ends exactly when :attr:`done` is true.
    """

    def __init__(
        self,
        rows: Sequence[DatasetRow],
        refill: Refill | None,
        low_water: int,
        expand: Callable[[Sequence[DatasetRow]], Iterable[DatasetRow]] = lambda rows: rows,
    ) -> None:
        self._refill = refill
        self._expand = expand
        self.low_water = max(1, low_water)
        self.rows: deque[DatasetRow] = deque(expand(rows))
        self.exhausted = refill is None

    def top_up(self, idle: bool) -> None:
        while not self.exhausted and len(self.rows) < self.low_water:
            assert self._refill is not None
            more = self._refill(idle and not self.rows)
            if more is None:
                self.exhausted = True
            elif more:
                self.rows.extend(self._expand(more))
            elif not (idle and not self.rows):
                return  # nothing yet, and rows in flight: ask again after the next step

    @property
    def done(self) -> bool:
        return self.exhausted and not self.rows


@dataclass
class SlotUse:
    """Decode steps taken and sequence slots filled over them: busy fraction = filled / (steps * n_seq).

    An engine that times its loop also counts what the host costs per token: ``loop_s`` (wall time of the
    decode loop, waits for more rows excluded) less ``decode_s`` (time inside the model's forward pass),
    over the ``picked`` tokens (every token chosen, a row's end token included). On a GPU that
    difference, not the arithmetic, bounds throughput.
    """

    steps: int = 0
    filled: int = 0
    slots: int = 0  # steps * n_seq
    picked: int = 0
    decode_s: float = 0.0
    loop_s: float = 0.0

    @property
    def busy_fraction(self) -> float | None:
        return self.filled / self.slots if self.slots else None

    @property
    def host_us_per_token(self) -> float | None:
        return (self.loop_s - self.decode_s) / self.picked * 1e6 if self.picked and self.loop_s else None

    def since(self, earlier: SlotUse) -> SlotUse:
        return SlotUse(
            self.steps - earlier.steps,
            self.filled - earlier.filled,
            self.slots - earlier.slots,
            self.picked - earlier.picked,
            self.decode_s - earlier.decode_s,
            self.loop_s - earlier.loop_s,
        )


class Engine(Protocol):
    """A loaded model that turns dataset rows into generations.

    ``generate`` calls ``on_done`` once per row, in completion order (batched engines finish rows out of
    order). A row that cannot be served (too long for the context, sampling failure) is reported as an
    exception for that row only; the engine keeps going. ``should_stop`` is polled between decode steps so
    a cancelled job or a lost lease stops work at the next row boundary. With ``refill`` the engine asks for
    more rows whenever fewer than ``n_seq`` wait to be admitted, and returns only once it answers None.
    ``slot_use`` counts, over the engine's life, the decode steps and the slots they filled.
    """

    variant: str  # what the worker advertises and each result names, e.g. "smollm2-135m-instruct:Q4_K_M"
    n_ctx: int  # context tokens per sequence: rows longer than this fail alone with RequestTooLong
    n_seq: int  # sequences decoded together; the worker registers it so `tokenmill workers` shows it
    n_threads: int  # CPU threads the engine really uses (after its own defaults), also registered
    load_ms: float  # model load time, reported in every result's timings
    slot_use: SlotUse

    def generate(
        self,
        rows: Sequence[DatasetRow],
        on_done: OnDone,
        should_stop: Callable[[], bool],
        refill: Refill | None = None,
    ) -> None: ...

    def close(self) -> None: ...


class EngineFactory(Protocol):
    """How a worker builds a backend once it has chosen a variant: a class or a function with this signature.

    Every backend takes the same keywords, so `tokenmill worker --engine NAME` can switch backends without
    the worker knowing any of them (the registry is :func:`tokenmill.engines.load_backend`).
    """

    def __call__(
        self,
        model_path: Path,
        variant: str,
        *,
        n_ctx_per_seq: int = ...,
        n_seq: int = ...,
        n_threads: int | None = ...,
        n_gpu_layers: int = ...,
        row_time_limit: float | None = ...,
    ) -> Engine: ...

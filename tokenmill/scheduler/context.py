"""The context per request a job runs with, sized from its rows and the model's trained context.

A worker's default context (2048 tokens) is right for chat rows, and wrong for a folder of documents:
parts budgeted for 2048 tokens are many and small while SmolLM2 was trained for 8192 and larger
models for 32768 or more. So a document job (or a dataset whose rows are long) gets the context its
longest request needs, up to the model's trained context, and pays for it with fewer sequences per
worker (:func:`tokenmill.models.sizing.trade_context`). The choice is stored in the job's options
(``n_ctx``), the documents are cut to it with the model's own tokenizer, and `tokenmill run` starts its
workers with it. ``--n-ctx`` sets it by hand. A request longer than the trained context is still refused
alone (context_length_exceeded); a document is cut into parts instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from tokenmill.errors import UsageError
from tokenmill.host import Capacity
from tokenmill.models.catalog import Family
from tokenmill.models.sizing import DEFAULT_KV_CELLS, N_SEQ_CHOICES, Prefer, trade_context
from tokenmill.models.tokenizer import Tokenizer
from tokenmill.rows import SamplingParams
from tokenmill.scheduler.submit import DEFAULT_CONTEXT, Submission

CONTEXT_STEP = 256  # llama.cpp rounds each sequence's KV stream up to this
MARKUP_ALLOWANCE = 64  # chat markup and JSON syntax a line's bytes do not cover, for the bytes bound


@dataclass(frozen=True)
class ContextChoice:
    n_ctx: int
    n_seq: int | None  # None: the worker's own choice (the widest batch that fits)
    note: str  # one line for the person running the job


@dataclass(frozen=True)
class Host:
    """Where the job's workers run, for the memory side of the trade (None fields: not known here)."""

    family: Family | None
    capacity: Capacity | None
    share: int = 1
    prefer: Prefer = "balanced"
    pinned: str | None = None


def _round_up(n: int) -> int:
    return -(-n // CONTEXT_STEP) * CONTEXT_STEP


def needed_context(sub: Submission, tokenizer: Tokenizer | None) -> tuple[int, str] | None:
    """(tokens, why) the job's longest request needs; None when a worker's default is enough or unknown.

    Documents: counted exactly with the tokenizer. A JSONL file: bounded by its longest line in bytes (a
    token is at least one byte), read only when some line is long enough to matter.
    """
    max_tokens = (sub.defaults or SamplingParams()).max_tokens
    if sub.path.is_dir():
        if tokenizer is None or not sub.template:
            return None
        from tokenmill.documents import load_template, longest_prompt

        tokens, name = longest_prompt(sub.path, load_template(sub.template), tokenizer)
        return tokens + max_tokens, f"{name} is {tokens:,} tokens whole"
    longest = longest_line_bytes(sub.path)
    need = longest + max_tokens + MARKUP_ALLOWANCE
    if need <= DEFAULT_CONTEXT:
        return None
    return need, f"the longest line is {longest:,} bytes"


def longest_line_bytes(path: Path) -> int:
    best = 0
    with open(path, "rb") as fh:
        for line in fh:
            best = max(best, len(line))
    return best


def choose_context(
    sub: Submission,
    tokenizer: Tokenizer | None,
    host: Host,
    *,
    n_ctx: int | None = None,
    n_seq: int | None = None,
) -> ContextChoice | None:
    """The context the job runs with (module doc); None: a worker's default, nothing to change."""
    trained = (tokenizer.n_ctx_train if tokenizer is not None else 0) or (
        host.family.n_ctx_train if host.family is not None else 0
    )
    if n_ctx is not None:
        if trained and n_ctx > trained:
            raise UsageError(f"--n-ctx {n_ctx} is above the {trained} tokens {sub.model} was trained for")
        return _fit(n_ctx, n_seq, host, f"{n_ctx} tokens per request (--n-ctx)")
    need = needed_context(sub, tokenizer)
    if need is None:
        return None
    tokens, why = need
    want = max(DEFAULT_CONTEXT, _round_up(tokens))
    if trained:
        want = min(want, trained)
    cap = f"{sub.model} was trained for {trained:,}" if trained else "the model's trained context is unknown"
    return _fit(want, n_seq, host, f"{why}; {cap}")


def _fit(want: int, n_seq: int | None, host: Host, why: str) -> ContextChoice:
    if host.family is None or host.capacity is None:  # a bare .gguf: no geometry to size memory by
        seqs = n_seq or next((k for k in N_SEQ_CHOICES if k * want <= max(DEFAULT_KV_CELLS, want)), 1)
        return ContextChoice(want, seqs, f"context: {want:,} tokens per request x {seqs} sequences per worker "
                                         f"({why})")
    ctx, seqs = trade_context(host.family, host.capacity, share=host.share, n_ctx=want, n_seq=n_seq,
                              pinned=host.pinned, prefer=host.prefer)
    fitted = "" if ctx == want else f"; {want:,} does not fit this worker's memory"
    return ContextChoice(ctx, seqs, f"context: {ctx:,} tokens per request x {seqs} sequences per worker "
                                    f"({why}{fitted})")


def with_context(sub: Submission, choice: ContextChoice | None, tokenizer: Tokenizer | None) -> Submission:
    """The submission cut (documents) and stored (options) for the chosen context."""
    return dataclasses.replace(sub, n_ctx=choice.n_ctx if choice else sub.n_ctx, counter=tokenizer or sub.counter)

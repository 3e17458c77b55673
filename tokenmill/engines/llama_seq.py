"""One row in flight in the batched llama.cpp engine, and the vocabulary tables its tokens are read through.

Per generated token the step loop does only what cannot wait: look the token's piece up, add it to the
row's text (stop strings), stamp the step's time into a flat array. Everything per row (timings in
milliseconds, logprobs spelled out, the :class:`Generation`) is built once, when the row finishes.
"""

from __future__ import annotations

import ctypes
from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tokenmill.engine import Generation, TokenLogprob
from tokenmill.engines.sampling import RowSampler, TextAccumulator
from tokenmill.rows import DatasetRow


class TokenTable:
    """Each token's bytes and whether it ends generation, asked of llama.cpp once per token per model.

    Filled as tokens first appear rather than all at load: a 49,152-token vocabulary would add a few
    hundred thousand ctypes calls to every worker's start-up for tokens most runs never see.
    """

    def __init__(self, llama_cpp: Any, vocab: Any, n_vocab: int) -> None:
        self._L, self._vocab = llama_cpp, vocab
        self.pieces: list[bytes | None] = [None] * n_vocab
        self.eog: list[bool | None] = [None] * n_vocab
        self._buf = (ctypes.c_char * 256)()

    def piece(self, token: int) -> bytes:
        piece = self.pieces[token]
        if piece is None:
            L, buf = self._L, self._buf
            n = L.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = (ctypes.c_char * -n)()
                n = L.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            piece = self.pieces[token] = buf.raw[:n]
        return piece

    def is_eog(self, token: int) -> bool:
        eog = self.eog[token]
        if eog is None:
            eog = self.eog[token] = bool(self._L.llama_vocab_is_eog(self._vocab, token))
        return eog


@dataclass(eq=False)
class Seq:
    """One row in flight in KV stream ``seq_id`` (its slot: the engine keeps slot index == seq_id)."""

    seq_id: int
    row: DatasetRow
    prompt: list[int]
    max_tokens: int
    sampler: RowSampler | None
    text: TextAccumulator
    cached: int
    n_past: int
    feed: list[int]  # tokens still to decode: the prompt's remainder, then the last sampled token
    admitted: float
    prompt_eval_ms: float = 0.0
    n_generated: int = 0
    stamps: array[float] = field(default_factory=lambda: array("d"))  # perf_counter when each token was chosen
    out_idx: int = -1  # batch index whose logits this sequence samples from after the current decode
    n_fed: int = 0  # tokens of ``feed`` placed in the current batch
    follows: Seq | None = None  # an n > 1 sibling waiting for this leader's prompt KV (see attach_followers)

    def take(self, token: int, piece: bytes, now: float) -> str | None:
        """Count a generated (not end-of-generation) token chosen at ``now``; the finish reason once done."""
        self.stamps.append(now)
        self.n_generated += 1
        if self.text.add(piece):
            return "stop"
        if self.n_generated >= self.max_tokens:
            return "length"
        self.feed.append(token)
        return None

    def finish(self, reason: str, now: float, tokens: TokenTable) -> Generation:
        stamps = np.frombuffer(self.stamps, dtype=np.float64)
        token_ms = np.diff(stamps, prepend=self.admitted) * 1000.0
        return Generation(
            text=self.text.text(),
            finish_reason=reason,
            prompt_tokens=len(self.prompt),
            completion_tokens=self.n_generated,
            cached_prompt_tokens=self.cached,
            prompt_eval_ms=self.prompt_eval_ms,
            ttft_ms=float(token_ms[0]) if len(token_ms) else 0.0,
            eval_ms=float(stamps[-1] - stamps[0]) * 1000.0 if len(stamps) else 0.0,
            total_ms=(now - self.admitted) * 1000.0,
            token_ms=token_ms.tolist(),
            logprobs=self._kept_logprobs(tokens),
        )

    def _kept_logprobs(self, tokens: TokenTable) -> list[TokenLogprob] | None:
        """Logprobs of the tokens that spell the returned text: not the end token, not past a stop string."""
        if self.sampler is None or self.sampler.logprobs is None:
            return None
        keep = len(self.text.kept_bytes())
        out, offset = [], 0
        for item in self.sampler.logprobs[: self.n_generated]:
            if offset >= keep:
                break
            item.piece = tokens.piece(item.token)
            item.top_pieces = [tokens.piece(t) for t, _ in item.top]
            offset += len(item.piece)
            out.append(item)
        return out

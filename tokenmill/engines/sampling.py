"""Per-sequence sampling and stop-string detection for the batched llama.cpp engine.

Kept apart from :mod:`tokenmill.engines.llama` so the text-side rules (stop strings over raw
bytes, UTF-8 tails) can be unit-tested without a model, and so the engine module stays about batching.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tokenmill.engine import TokenLogprob
from tokenmill.errors import RowRefused
from tokenmill.rows import SamplingParams

DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: "pick a random seed"
BAN = -100.0  # OpenAI: a bias of -100 should ban the token; llama.cpp adds biases, so make it -inf
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)


class SamplerError(RowRefused):
    """A row's sampling request cannot be set up on this model (bad token id, grammar llama.cpp refuses)."""


class TokenMask(Protocol):
    """A JSON-schema row's matcher (see :mod:`.constrain`): the tokens allowed next, and the one taken."""

    def allowed(self) -> np.ndarray: ...

    def accept(self, token: int) -> None: ...


def make_sampler(llama_cpp: Any, params: SamplingParams, *, n_vocab: int = 0, seed_offset: int = 0) -> Any:
    """A fresh sampler chain for one row, to be freed with ``llama_sampler_free``.

    Each row gets its own chain because the dist sampler and the penalties carry state: sharing one
    chain across sequences would make a row's output depend on which rows were decoded beside it.
    Order: logit bias, penalties (over the row's generated tokens, as OpenAI counts them), then
    temperature and the truncations on the scaled distribution (OpenAI/vLLM semantics). The grammar is
    not in the chain; :class:`RowSampler` applies it only when the chain's pick breaks it.
    """
    L = llama_cpp
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    if params.logit_bias:
        _add_logit_bias(L, chain, params.logit_bias, n_vocab)
    if _penalised(params):
        window = max(64, min(params.max_tokens, 8192))
        # llama.cpp takes (last_n, repeat, freq, present); llama-cpp-python's binding declares an extra
        # leading int. Both int arguments travel in integer registers, so passing the window twice is
        # right whichever the library reads.
        penalties = L.llama_sampler_init_penalties(
            window,
            window,
            float(params.repetition_penalty),
            float(params.frequency_penalty),
            float(params.presence_penalty),
        )
        L.llama_sampler_chain_add(chain, penalties)
    if params.temperature <= 0.0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        return chain
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(float(params.temperature)))
    if params.top_k > 0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(int(params.top_k)))
    if 0.0 < params.top_p < 1.0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(float(params.top_p), 1))
    if params.min_p > 0.0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(float(params.min_p), 1))
    seed = DEFAULT_SEED if params.seed is None else (int(params.seed) + seed_offset) & 0xFFFFFFFF
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))
    return chain


def _penalised(params: SamplingParams) -> bool:
    return bool(params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0)


def _add_logit_bias(L: Any, chain: Any, bias: tuple[tuple[int, float], ...], n_vocab: int) -> None:
    bad = [t for t, _ in bias if t >= n_vocab]
    if bad:
        raise SamplerError(f"logit_bias names token {bad[0]}, but this model's vocabulary has {n_vocab} tokens")
    items = (L.llama_logit_bias * len(bias))()
    for i, (token, value) in enumerate(bias):
        items[i].token = token
        items[i].bias = -math.inf if value <= BAN else value
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(n_vocab, len(bias), items))


@dataclass
class _Candidates:
    """A reusable llama_token_data_array over the whole vocabulary, filled from the logits with numpy."""

    data: np.ndarray
    array: Any

    @classmethod
    def create(cls, L: Any, n_vocab: int) -> _Candidates:
        data = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        data["id"] = np.arange(n_vocab, dtype=np.int32)
        ptr = data.ctypes.data_as(ctypes.POINTER(L.llama_token_data))
        return cls(data, L.llama_token_data_array(data=ptr, size=n_vocab, selected=-1, sorted=False))

    def fill(self, logits: np.ndarray) -> Any:
        """Reset every candidate (a previous apply may have sorted and truncated them) to this step's logits."""
        n = len(self.data)
        self.data["id"] = np.arange(n, dtype=np.int32)
        self.data["logit"] = logits
        self.data["p"] = 0.0
        self.array.size, self.array.selected, self.array.sorted = n, -1, False
        return ctypes.byref(self.array)


class RowSampler:
    """Sampling for one sequence: the chain, an optional grammar or JSON mask, and the logprobs asked for.

    A row without grammar, mask or logprobs is sampled by ``llama_sampler_sample`` as before. A GBNF
    row follows llama.cpp's ``common_sampler_sample``: sample with the chain, check only the picked
    token against the grammar (one candidate, cheap), and only when it breaks the grammar apply the
    grammar to the whole vocabulary and sample again; llama.cpp's grammar over all tokens on every step
    is what makes it slow. A JSON-schema row's mask costs tens of microseconds for the whole vocabulary,
    so it is applied to the logits on every step, before the chain. Logprobs are the model's own, unmasked.
    """

    def __init__(
        self,
        llama_cpp: Any,
        vocab: Any,
        params: SamplingParams,
        n_vocab: int,
        seed_offset: int = 0,
        mask: TokenMask | None = None,
    ) -> None:
        self._L = llama_cpp
        self.n_vocab = n_vocab
        self.mask = mask
        self.top_logprobs = params.logprobs
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.grammar: Any = None
        # The chain would be llama.cpp's greedy sampler alone, which keeps no state: the engine takes
        # such rows' tokens with one argmax over the whole batch's logits (see llama_step.py).
        self.greedy = (
            params.temperature <= 0.0
            and not params.logit_bias
            and not _penalised(params)
            and params.grammar is None
            and mask is None
            and params.logprobs is None
        )
        self.chain: Any = make_sampler(llama_cpp, params, n_vocab=n_vocab, seed_offset=seed_offset)
        if params.grammar is not None:
            self.grammar = llama_cpp.llama_sampler_init_grammar(vocab, params.grammar.encode("utf-8"), b"root")
            if not self.grammar:
                self.free()
                raise SamplerError("llama.cpp could not compile the row's grammar (see the worker log)")
        self._all: _Candidates | None = None
        self._one: _Candidates | None = None

    def sample(self, ctx: Any, idx: int) -> int:
        L = self._L
        if self.grammar is None and self.logprobs is None and self.mask is None:
            return int(L.llama_sampler_sample(self.chain, ctx, idx))
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, idx), shape=(self.n_vocab,))
        token = self._pick(logits) if self.mask is None else self._pick_allowed(logits, self.mask)
        if self.grammar is not None:
            L.llama_sampler_accept(self.grammar, token)
        L.llama_sampler_accept(self.chain, token)
        if self.logprobs is not None:
            self.logprobs.append(_logprob(logits, token, self.top_logprobs or 0))
        return token

    def _pick(self, logits: np.ndarray) -> int:
        L = self._L
        if self._all is None:
            self._all = _Candidates.create(L, self.n_vocab)
        ref = self._all.fill(logits)
        L.llama_sampler_apply(self.chain, ref)
        token = int(self._all.data["id"][self._all.array.selected])
        if self.grammar is None:
            return token
        if self._one is None:
            self._one = _Candidates.create(L, 1)
        one = self._one
        one.data["id"][0], one.data["logit"][0], one.data["p"][0] = token, 1.0, 0.0
        one.array.size, one.array.selected, one.array.sorted = 1, -1, False
        L.llama_sampler_apply(self.grammar, ctypes.byref(one.array))
        if math.isfinite(float(one.data["logit"][0])):
            return token
        ref = self._all.fill(logits)
        L.llama_sampler_apply(self.grammar, ref)
        L.llama_sampler_apply(self.chain, ref)
        return int(self._all.data["id"][self._all.array.selected])

    def _pick_allowed(self, logits: np.ndarray, mask: TokenMask) -> int:
        """The chain's pick among the tokens the JSON schema allows; the matcher takes it."""
        if self._all is None:
            self._all = _Candidates.create(self._L, self.n_vocab)
        ref = self._all.fill(np.where(mask.allowed(), logits, -np.inf))
        self._L.llama_sampler_apply(self.chain, ref)
        token = int(self._all.data["id"][self._all.array.selected])
        mask.accept(token)
        return token

    def free(self) -> None:
        for name in ("chain", "grammar"):
            sampler = getattr(self, name, None)
            if sampler:
                self._L.llama_sampler_free(sampler)
            setattr(self, name, None)


def _logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """log-softmax of the model's logits for this step: the chosen token's and the ``top`` best."""
    work = logits.astype(np.float64)
    peak = float(work.max())
    log_z = peak + math.log(float(np.exp(work - peak).sum()))
    best: list[tuple[int, float]] = []
    if top > 0:
        ids = np.argpartition(-work, top - 1)[:top]
        ids = ids[np.argsort(-work[ids], kind="stable")]
        best = [(int(i), float(work[i]) - log_z) for i in ids]
    return TokenLogprob(token=token, logprob=float(work[token]) - log_z, top=best)


class TextAccumulator:
    """Generated bytes plus stop-string detection, done on bytes rather than str.

    Token pieces may end in the middle of a multi-byte character, so decoding piece by piece would
    either fail or emit replacement characters; stop strings are matched against the raw UTF-8 bytes
    (a valid UTF-8 needle can only match at character boundaries) and the text is decoded once at the end.
    """

    __slots__ = ("_buf", "_longest", "_stops", "stopped_at")

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self._stops = [s.encode("utf-8") for s in stops if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self._buf = bytearray()
        self.stopped_at: int | None = None

    def add(self, piece: bytes) -> bool:
        """Append one token's bytes; True when a stop string now appears (the text is cut before it)."""
        start = max(0, len(self._buf) - self._longest + 1)
        self._buf += piece
        if not self._stops:
            return False
        found = -1
        for stop in self._stops:
            at = self._buf.find(stop, start)
            if at >= 0 and (found < 0 or at < found):
                found = at
        if found < 0:
            return False
        self.stopped_at = found
        return True

    def kept_bytes(self) -> bytes:
        """The generated bytes up to (not including) the stop string."""
        return bytes(self._buf if self.stopped_at is None else self._buf[: self.stopped_at])

    def text(self) -> str:
        """The text so far, without any stop string and without a dangling partial character."""
        return self.kept_bytes().decode("utf-8", errors="ignore")

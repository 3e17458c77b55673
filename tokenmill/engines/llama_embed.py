"""Embeddings on llama.cpp: many inputs per ``llama_decode``, one sequence each, pooled by llama.cpp.

The context is created with ``embeddings = True`` and the model's pooling type (its GGUF says CLS or
MEAN for BERT-style encoders; decoder-only models such as SmolLM2 say nothing and get MEAN, as
llama-server's ``--pooling mean``). Inputs are packed into one batch until ``n_batch`` tokens or
``n_seq_max`` sequences, each under its own seq_id; after the decode ``llama_get_embeddings_seq`` gives
the pooled vector per sequence, which is L2-normalised as OpenAI's are. Encoders (BERT) go through
``llama_encode``; decoder models through ``llama_decode`` with a unified KV cache cleared between
batches. Either way an input attends only to its own tokens (llama.cpp masks by seq_id).

The batch is tokenmill's own ``llama_batch`` over numpy arrays (:mod:`.llama_batch`), so filling it is a
few array copies per input instead of five ctypes stores per token.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tokenmill.engine import EmbeddingResult, OnDone
from tokenmill.engines.llama_batch import NumpyBatch
from tokenmill.errors import ModelLoadError, RequestTooLong
from tokenmill.rows import DatasetRow


@dataclass
class _Pending:
    """One row's inputs as tokens, and the vectors filled in as their sequences are decoded."""

    row: DatasetRow
    tokens: list[np.ndarray]
    vectors: list[np.ndarray | None]
    started: float
    left: int = 0
    eval_s: float = 0.0


@dataclass
class _Packed:
    """What one decode holds: (pending row, input index) per seq_id, and the token count."""

    owners: list[tuple[_Pending, int]] = field(default_factory=list)
    n_tokens: int = 0


class LlamaEmbedder:
    """An embeddings context on a loaded llama.cpp model (``model`` is borrowed, never freed here).

    ``n_batch`` tokens (default :func:`batch_for_vocab`) go into one decode and one ubatch (a pooled
    sequence must not be split, and non-causal encoders attend over the whole ubatch), so it is also the
    longest input served; an input longer than that, or than the model's training context, fails its row
    with :class:`RequestTooLong`.
    """

    def __init__(
        self,
        L: Any,
        model: Any,
        variant: str,
        *,
        n_batch: int | None = None,
        n_threads: int = 1,
        n_seq_max: int = 0,
        pack_tokens: int = 0,
    ) -> None:
        started = time.perf_counter()
        self._L, self._model, self.variant = L, model, variant
        self._ctx: Any = None
        self._vocab = L.llama_model_get_vocab(model)
        self.n_vocab = int(L.llama_vocab_n_tokens(self._vocab))
        n_batch = n_batch or batch_for_vocab(self.n_vocab)
        self.n_embd = int(L.llama_model_n_embd(model))
        n_train = int(L.llama_model_n_ctx_train(model)) or n_batch
        self.n_ctx = min(n_batch, n_train)
        self.n_batch = n_batch
        self.pack_tokens = min(pack_tokens or PACK_TOKENS, n_batch)
        self.n_seq_max = min(n_seq_max or n_batch, int(L.llama_max_parallel_sequences()), n_batch)
        self._ctx = self._context(L.LLAMA_POOLING_TYPE_UNSPECIFIED, n_threads)
        self.pooling = int(L.llama_pooling_type(self._ctx))
        if self.pooling == L.LLAMA_POOLING_TYPE_NONE:  # decoder-only model: mean over its tokens
            L.llama_free(self._ctx)
            self._ctx = None
            self._ctx = self._context(L.LLAMA_POOLING_TYPE_MEAN, n_threads)
            self.pooling = int(L.llama_pooling_type(self._ctx))
        if self.pooling == L.LLAMA_POOLING_TYPE_RANK:
            self.close()
            raise ModelLoadError(f"{variant} is a reranker (rank pooling); it gives scores, not embeddings")
        self._mem = L.llama_get_memory(self._ctx)  # NULL for encoders, which keep no KV cache
        self._batch = NumpyBatch(L, self.n_batch)
        self.load_ms = (time.perf_counter() - started) * 1000.0

    def _context(self, pooling: int, n_threads: int) -> Any:
        L = self._L
        cparams = L.llama_context_default_params()
        cparams.n_ctx = self.n_batch
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = self.n_seq_max
        cparams.kv_unified = True
        cparams.embeddings = True
        cparams.pooling_type = pooling
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_AUTO
        ctx = L.llama_init_from_model(self._model, cparams)
        if not ctx:
            raise ModelLoadError(f"llama.cpp could not create an embeddings context of {self.n_batch} tokens")
        return ctx

    # -- tokens ------------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Tokens with the model's own BOS/CLS and EOS/SEP, markup not parsed (what ``Llama.embed`` feeds)."""
        L = self._L
        data = text.encode("utf-8")
        size = len(data) + 8
        buf = (L.llama_token * size)()
        n = L.llama_tokenize(self._vocab, data, len(data), buf, size, True, False)
        if n < 0:
            size = -n
            buf = (L.llama_token * size)()
            n = L.llama_tokenize(self._vocab, data, len(data), buf, size, True, False)
        return list(buf[:n])

    def _prepare(self, row: DatasetRow) -> _Pending:
        """The row's inputs as token arrays; a row that cannot be served raises here, before any decode."""
        if row.dimensions is not None and row.dimensions != self.n_embd:
            raise ValueError(
                f"dimensions={row.dimensions} is not supported: {self.variant} gives {self.n_embd}-dimensional "
                "embeddings and cannot shorten them (leave dimensions out)"
            )
        tokens: list[np.ndarray] = []
        for i, item in enumerate(row.inputs or ()):
            ids = self.tokenize(item) if isinstance(item, str) else list(item)
            if not ids:
                raise ValueError(f"input[{i}] gives no tokens")
            if len(ids) > self.n_ctx:
                raise RequestTooLong(
                    f"input[{i}] is {len(ids)} tokens; the embeddings context of {self.variant} is {self.n_ctx}"
                )
            if max(ids) >= self.n_vocab:
                raise ValueError(f"input[{i}] has token id {max(ids)}; the model's vocabulary has {self.n_vocab}")
            tokens.append(np.asarray(ids, dtype=np.int32))
        if not tokens:
            raise ValueError("the row has no inputs")
        return _Pending(row, tokens, [None] * len(tokens), time.perf_counter(), left=len(tokens))

    # -- embedding ---------------------------------------------------------------------------------

    def generate(self, rows: Sequence[DatasetRow], on_done: OnDone, should_stop: Callable[[], bool]) -> None:
        """Embed every row's inputs; ``on_done`` once per row as its last input is pooled.

        Inputs of several rows share a decode; ``should_stop`` is polled between decodes, and the rows
        not finished then stay unreported, as the generation engine leaves them.
        """
        queue: list[tuple[_Pending, int]] = []
        for row in rows:
            try:
                pending = self._prepare(row)
            except Exception as exc:
                on_done(row, exc)
                continue
            queue.extend((pending, i) for i in range(len(pending.tokens)))
        at = 0
        while at < len(queue):
            if should_stop():
                return
            packed = _Packed()
            while at < len(queue) and len(packed.owners) < self.n_seq_max:
                pending, i = queue[at]
                if packed.owners and packed.n_tokens + len(pending.tokens[i]) > self.pack_tokens:
                    break
                packed.owners.append((pending, i))
                packed.n_tokens += len(pending.tokens[i])
                at += 1
            self._run(packed, on_done)

    def _run(self, packed: _Packed, on_done: OnDone) -> None:
        """Decode one packed batch and hand out its vectors; a failed decode fails the rows it held."""
        L = self._L
        n = 0
        for seq_id, (pending, i) in enumerate(packed.owners):
            n = self._batch.put(n, pending.tokens[i], 0, seq_id, outputs=True)  # pooling reads every token
        batch = self._batch.ready(n)
        t0 = time.perf_counter()
        if self._mem:
            L.llama_memory_clear(self._mem, True)
            rc = L.llama_decode(self._ctx, batch)
        else:  # an encoder keeps no KV cache; llama_decode would say so and call encode itself
            rc = L.llama_encode(self._ctx, batch)
        elapsed = time.perf_counter() - t0
        failed: set[int] = set()
        for seq_id, (pending, i) in enumerate(packed.owners):
            if id(pending) in failed or pending.left == 0:
                continue
            ptr = L.llama_get_embeddings_seq(self._ctx, seq_id) if rc == 0 else None
            if not ptr:
                failed.add(id(pending))
                pending.left = 0
                on_done(pending.row, RuntimeError(f"llama_decode failed with status {rc} on {n} tokens"))
                continue
            pending.vectors[i] = _unit(np.ctypeslib.as_array(ptr, shape=(self.n_embd,)))
            pending.eval_s += elapsed * len(pending.tokens[i]) / n
            pending.left -= 1
            if pending.left == 0:
                on_done(pending.row, self._result(pending))

    def _result(self, pending: _Pending) -> EmbeddingResult:
        n_tokens = sum(len(t) for t in pending.tokens)
        total_ms = (time.perf_counter() - pending.started) * 1000.0
        return EmbeddingResult(
            text="",
            finish_reason="stop",
            prompt_tokens=n_tokens,
            completion_tokens=0,
            prompt_eval_ms=pending.eval_s * 1000.0,
            total_ms=total_ms,
            vectors=[v.tolist() for v in pending.vectors if v is not None],
        )

    def close(self) -> None:
        """Free the context (the model belongs to whoever loaded it); safe to call twice."""
        if self._ctx:
            self._L.llama_free(self._ctx)
        self._ctx = None


MAX_BATCH = 2048
# Tokens packed into one decode. Every token of a pass attends over the whole pass (masked by seq_id), so
# the attention work grows with the square of this; past a few hundred tokens that outweighs what a wider
# matrix multiply gains. all-MiniLM on this 2-core host, inputs/s by tokens per pass: 2048: 16.6,
# 1024: 22.3, 512: 23.6-27.9, 256: 26.3, 128: 32.2 (benchmarks/embeddings.py inputs, one thread).
PACK_TOKENS = 256
OUTPUT_BUFFER_BYTES = 256 * 2**20


def batch_for_vocab(n_vocab: int) -> int:
    """Tokens per decode: a power of two from 512 to MAX_BATCH whose output buffer stays bounded.

    llama.cpp sizes a decoder's compute buffer for ``n_ubatch x n_vocab`` float logits even when only the
    pooled embeddings are read (SmolLM2 at 2048 tokens: 400 MB; a 128k-vocabulary model: 1 GB), which the
    worker's memory sizing never counted. BERT-sized vocabularies get the full 2048.
    """
    fit = OUTPUT_BUFFER_BYTES // max(1, n_vocab * 4)
    size = 512  # the floor: BERT-style models take 512-token inputs, whatever their vocabulary
    while size * 2 <= min(fit, MAX_BATCH):
        size *= 2
    return size


def _unit(vector: np.ndarray) -> np.ndarray:
    """L2-normalised float32 copy (the pointer's memory is reused by the next decode).

    float32 is what the model computed and what base64 carries, so both encodings hold the same numbers.
    """
    out = np.array(vector, dtype=np.float32)
    norm = float(np.linalg.norm(out.astype(np.float64)))
    return out / np.float32(norm) if norm > 0 else out


def load_embedder(model_path: str, variant: str, **kwargs: Any) -> tuple[LlamaEmbedder, Callable[[], None]]:
    """An embedder on its own copy of the model, and the function that frees both (benchmarks, tests)."""
    L: Any = importlib.import_module("llama_cpp")
    L.llama_backend_init()
    from tokenmill.engines import llama_guard

    model = L.llama_model_load_from_file(model_path.encode("utf-8"), llama_guard.model_params(L))
    if not model:
        raise ModelLoadError(f"llama.cpp could not load {model_path}")
    embedder = LlamaEmbedder(L, model, variant, **kwargs)

    def close() -> None:
        embedder.close()
        L.llama_model_free(model)

    return embedder, close

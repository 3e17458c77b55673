"""The llama.cpp engine: continuous batching over one llama_context with one KV stream per sequence.

llama-cpp-python's ``Llama`` decodes a single sequence, so this engine drives the low-level API the way
llama.cpp's ``examples/parallel`` does: up to ``n_seq`` rows are in flight, every ``llama_decode`` call
feeds one token per generating row plus prompt chunks of newly admitted rows, and a finished row's slot
is cleared and refilled at once.

KV layout: the context is created with ``kv_unified = False`` and ``n_seq_max = n_seq (+1)``, which
gives every sequence its own KV stream of ``n_ctx_per_seq`` cells (llama.cpp splits ``n_ctx`` evenly,
rounded up to 256), so attention only spans a row's own tokens and every row really has the full
per-request context. The extra stream holds the shared prompt prefix (see :mod:`.prefix`); copying it
into a row is a whole-stream buffer copy, much cheaper than re-evaluating the prefix. llama.cpp only
puts consecutive seq_ids in one forward pass, so once nothing is left to admit, rows are moved down to
close the gaps finished rows leave (see :meth:`.llama_step.Stepper.compact`).

This module loads the model, formats and tokenizes prompts and admits rows; the decode step, where the
host's cost per token is decided, is :mod:`.llama_step`, and a row in flight is :class:`.llama_seq.Seq`.

``llama_cpp`` is imported in the constructor only: importing this module in a parent that forks must
not initialise ggml backends (or CUDA).
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tokenmill.engine import OnDone, Refill, RowQueue, SlotUse
from tokenmill.engines import llama_guard
from tokenmill.engines.choices import ChoiceMerger
from tokenmill.engines.constrain import JsonConstraints, RowMatcher
from tokenmill.engines.llama_batch import NumpyBatch
from tokenmill.engines.llama_embed import LlamaEmbedder
from tokenmill.engines.llama_seq import Seq, TokenTable
from tokenmill.engines.llama_step import Stepper
from tokenmill.engines.prefix import best_shared_prefix, common_prefix_len
from tokenmill.engines.sampling import RowSampler, TextAccumulator
from tokenmill.errors import ModelError, ModelLoadError, RequestTooLong, RowRefused
from tokenmill.rows import EMBEDDINGS, MESSAGE_ENDPOINTS, DatasetRow

log = logging.getLogger(__name__)

MIN_SHARED_PREFIX = 16  # below this, copying a whole KV stream costs about what re-evaluating would


class LlamaEngine:
    """A GGUF model loaded once per worker process, serving rows with continuous batching.

    ``n_ctx`` is the context one row gets (prompt + max_tokens), capped at the model's training context.
    A row whose prompt + ``max_tokens`` does not fit is refused with :class:`RequestTooLong`, as
    OpenAI and vLLM refuse it (HTTP 400) rather than silently truncating the completion: a batch result
    cut short by the context would look like a model answer.

    ``prefix_cache`` costs one more KV stream (memory for ``n_seq + 1`` streams of ``n_ctx`` tokens) and
    saves re-evaluating a shared prompt head for every row. ``flash_attn`` defaults to on because it is
    the faster kernel on CPU; llama-cpp-python's ``Llama`` defaults to off, and at temperature 0 the two
    kernels can pick different tokens, so pass ``flash_attn=False`` to reproduce a default ``Llama``.
    """

    def __init__(
        self,
        model_path: Path,
        variant: str,
        *,
        n_ctx_per_seq: int = 2048,
        n_seq: int = 8,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        row_time_limit: float | None = None,
        n_batch: int = 512,
        prefix_cache: bool = True,
        flash_attn: bool = True,
        verbose: bool = False,
    ) -> None:
        started = time.perf_counter()
        if n_seq < 1 or n_ctx_per_seq < 16:
            raise ValueError("n_seq must be >= 1 and n_ctx_per_seq >= 16")
        self.variant = variant
        self.n_seq = n_seq
        self.row_time_limit = row_time_limit  # seconds from a row's admission; None: no limit
        self._ctx: Any = None
        self._model: Any = None
        self._batch: NumpyBatch | None = None
        self._prefix: list[int] = []
        self._formatter: Any = None
        self._constraints: JsonConstraints | None = None
        self._embedder: LlamaEmbedder | None = None  # an embeddings context on these weights, made on first use
        self._longest_token: int | None = None
        self.slot_use = SlotUse()
        path = Path(model_path)
        if not path.is_file():
            raise ModelLoadError(f"model file {path} does not exist")
        if not verbose:
            logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        L: Any = importlib.import_module("llama_cpp")
        self._L = L
        L.llama_backend_init()
        mparams = llama_guard.model_params(L)
        mparams.n_gpu_layers = n_gpu_layers
        self._model = L.llama_model_load_from_file(str(path).encode("utf-8"), mparams)
        if not self._model:
            raise ModelLoadError(f"llama.cpp could not load {path} (not a GGUF file, or not enough memory)")
        if L.llama_model_has_encoder(self._model):
            self.close()
            raise ModelLoadError(f"{path} is an encoder-decoder model; tokenmill serves decoder-only models")
        if L.llama_model_is_recurrent(self._model) or L.llama_model_is_hybrid(self._model):
            prefix_cache = False  # recurrent state cannot be cut back to a prefix
        self.prefix_cache = prefix_cache
        self._vocab = L.llama_model_get_vocab(self._model)
        self._n_vocab = int(L.llama_vocab_n_tokens(self._vocab))
        self._tokens = TokenTable(L, self._vocab, self._n_vocab)
        self.n_ctx = min(n_ctx_per_seq, int(L.llama_model_n_ctx_train(self._model)) or n_ctx_per_seq)
        self._prefix_seq = n_seq if prefix_cache else -1
        n_streams = n_seq + (1 if prefix_cache else 0)
        self._n_batch = max(n_batch, n_seq)
        threads = n_threads or _physical_cores()
        self.n_threads = threads
        cparams = L.llama_context_default_params()
        cparams.n_ctx = _round_up(self.n_ctx, 256) * n_streams
        cparams.n_seq_max = n_streams
        cparams.kv_unified = False
        cparams.n_batch = self._n_batch
        cparams.n_ubatch = min(self._n_batch, 512)
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        # AUTO: flash attention wherever the backend has the kernel (every CPU does), off elsewhere.
        cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._ctx = L.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise ModelLoadError(
                f"llama.cpp could not create a context of {n_streams} x {self.n_ctx} tokens for {path}; "
                "lower n_seq or n_ctx_per_seq"
            )
        if int(L.llama_n_ctx_seq(self._ctx)) < self.n_ctx:
            self.close()
            raise ModelLoadError(f"llama.cpp gave each sequence fewer than {self.n_ctx} context tokens")
        self._mem = L.llama_get_memory(self._ctx)
        self._batch = NumpyBatch(L, self._n_batch)
        self._init_special_tokens()
        self.load_ms = (time.perf_counter() - started) * 1000.0

    def _init_special_tokens(self) -> None:
        L, vocab = self._L, self._vocab
        self._bos = int(L.llama_vocab_bos(vocab))
        self._eos = int(L.llama_vocab_eos(vocab))
        sep = int(L.llama_vocab_sep(vocab))
        # Same rules as Llama._create_completion, so completion prompts tokenize identically.
        self._prompt_head = [self._bos] if L.llama_vocab_get_add_bos(vocab) and self._bos != -1 else []
        tail = sep if sep != -1 else self._eos
        add_tail = L.llama_vocab_get_add_eos(vocab) or sep != -1
        self._prompt_tail = [tail] if add_tail and tail != -1 else []

    # -- tokens and prompts ------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """Tokens of ``text``; ``parse_special`` turns markup such as ``<|im_start|>`` into control tokens."""
        L = self._L
        data = text.encode("utf-8")
        size = len(data) + 8
        buf = (L.llama_token * size)()
        n = L.llama_tokenize(self._vocab, data, len(data), buf, size, add_special, parse_special)
        if n < 0:
            size = -n
            buf = (L.llama_token * size)()
            n = L.llama_tokenize(self._vocab, data, len(data), buf, size, add_special, parse_special)
        return list(buf[:n])

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` adds to a prompt (no BOS), for chunk sizing and document splitting."""
        return len(self.tokenize(text))

    def format_prompt(self, row: DatasetRow) -> list[int]:
        """The prompt tokens of a row exactly as ``create_chat_completion``/``create_completion`` build them."""
        if row.endpoint in MESSAGE_ENDPOINTS:
            return self._chat_tokens([dict(m) for m in row.messages or ()])
        prompt = row.prompt or ""
        tokens = self._prompt_head + (self.tokenize(prompt) if prompt else []) + self._prompt_tail
        if not tokens and self._bos == -1:
            raise ValueError("the prompt is empty and the model has no BOS token to start from")
        return tokens or [self._bos]

    def _chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat prompt with only the template's own markup special: user text never becomes control tokens.

        The template is rendered with a placeholder per message content; the markup between placeholders
        is tokenized with special tokens parsed, each content as plain text. Where the template changes a
        content (drops a placeholder) the real rendering is tokenized as a whole, which is safe only if no
        content holds control-token markup; such a row is refused rather than given injected turns.
        """
        formatter = self._chat_formatter()
        marks = [f"\x00tm-content-{i}\x00" for i in range(len(messages))]
        masked = formatter(messages=[{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)]).prompt
        tokens: list[int] = []
        rest = masked
        for mark, message in zip(marks, messages, strict=True):
            head, found, rest = rest.partition(mark)
            if not found:
                return self._whole_chat_tokens(formatter, messages)
            tokens += self.tokenize(head) if head else []
            tokens += self.tokenize(message["content"], parse_special=False) if message["content"] else []
        return tokens + (self.tokenize(rest) if rest else [])

    def _whole_chat_tokens(self, formatter: Any, messages: list[dict[str, str]]) -> list[int]:
        for message in messages:
            text = message["content"]
            if text and self.tokenize(text) != self.tokenize(text, parse_special=False):
                raise RowRefused(
                    "a message holds control-token markup and this model's chat template rewrites contents"
                )
        return list(self.tokenize(formatter(messages=messages).prompt))

    def _chat_formatter(self) -> Any:
        if self._formatter is None:
            L = self._L
            raw = L.llama_model_chat_template(self._model, None)
            if not raw:
                raise ModelError(f"model {self.variant} has no chat template; send prompt rows instead")
            chat_format = importlib.import_module("llama_cpp.llama_chat_format")
            self._formatter = chat_format.Jinja2ChatFormatter(
                template=raw.decode("utf-8"),
                eos_token=self._token_text(self._eos),
                bos_token=self._token_text(self._bos),
                add_generation_prompt=True,
                stop_token_ids=[self._eos],
            )
        return self._formatter

    def _token_text(self, token: int) -> str:
        if token == -1:
            return ""
        return bytes(self._L.llama_vocab_get_text(self._vocab, token)).decode("utf-8", errors="replace")

    # -- generation --------------------------------------------------------------------------------

    def generate(
        self,
        rows: Sequence[DatasetRow],
        on_done: OnDone,
        should_stop: Callable[[], bool],
        refill: Refill | None = None,
    ) -> None:
        """Serve ``rows`` (and what ``refill`` adds) with up to ``n_seq`` in flight; ``on_done`` per row.

        Rows are tokenized one at a time as they are admitted (a chunk of huge rows never sits in memory
        as tokens all at once); the first ``2 * n_seq`` are tokenized ahead to choose the shared prefix.
        A row that fails to format or is too long is reported when its turn to be admitted comes, so a
        stop request leaves later rows unreported. The prefix's own evaluation is not charged to any row.
        A row asking for ``n`` choices runs as n sibling sequences sharing one prompt evaluation.
        """
        merger = ChoiceMerger(on_done)

        def expand(batch: Sequence[DatasetRow]) -> list[DatasetRow]:
            embeds = [r for r in batch if r.endpoint == EMBEDDINGS]
            if embeds:  # a job is all embeddings or none: they take the embeddings context, synchronously
                self._embed(embeds, on_done, should_stop)
            return merger.expand([r for r in batch if r.endpoint != EMBEDDINGS])

        queue = RowQueue(rows, refill, low_water=self.n_seq, expand=expand)
        ahead = self._tokenize_ahead(queue)
        assert self._batch is not None
        stepper = Stepper(
            self._L, self._ctx, self._mem, self._batch, self._tokens, self.slot_use,
            n_vocab=self._n_vocab, row_time_limit=self.row_time_limit,
        )  # fmt: skip
        slots: list[Seq | None] = [None] * self.n_seq  # slot index == seq_id of the row in it
        live: dict[int, Seq] = {}  # id(row) of each sequence in flight: later n > 1 siblings copy its prompt
        try:
            while True:
                queue.top_up(idle=not any(slots))
                started = time.perf_counter()
                for sid in range(self.n_seq):
                    if slots[sid] is None:
                        slots[sid] = self._admit(sid, queue, ahead, merger, live, merger.done)
                if not queue.rows:
                    stepper.compact(slots)
                active = [s for s in slots if s is not None]
                if (not active and queue.done) or should_stop():
                    return
                if active:
                    stepper.step(active, slots, live, merger.done)
                self.slot_use.loop_s += time.perf_counter() - started
                if should_stop():
                    return
        finally:
            for left in slots:
                if left is not None:
                    stepper.release(left)

    def _tokenize_ahead(self, queue: RowQueue) -> dict[int, list[int] | Exception]:
        """Tokens of the first rows, by ``id(row)``, and the shared prefix chosen over them."""
        ahead: dict[int, list[int] | Exception] = {}
        if not self.prefix_cache:
            return ahead
        for row in list(queue.rows)[: 2 * self.n_seq]:
            try:
                ahead[id(row)] = self._row_tokens(row)
            except Exception as exc:
                ahead[id(row)] = exc
        fits = [t for t in ahead.values() if isinstance(t, list) and len(t) < self.n_ctx]
        self._set_prefix(best_shared_prefix(fits, min_tokens=MIN_SHARED_PREFIX, max_tokens=self.n_ctx - 1))
        return ahead

    def _row_tokens(self, row: DatasetRow) -> list[int]:
        """The row's prompt tokens, refusing first, from its length alone, a row that cannot fit the context."""
        chars = row.prompt_chars
        if chars > self.n_ctx:
            longest = self._longest_token_bytes()
            if chars > self.n_ctx * longest:
                raise RequestTooLong(
                    f"prompt is {chars} characters, at least {chars // longest} tokens; "
                    f"the model context is {self.n_ctx} per request"
                )
        return self.format_prompt(row)

    def _longest_token_bytes(self) -> int:
        """The longest text any token spells (control tokens included): bytes / this bounds tokens below."""
        if self._longest_token is None:
            L, buf = self._L, (ctypes.c_char * 512)()
            longest = 1
            for token in range(self._n_vocab):
                n = L.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
                longest = max(longest, abs(n))
            self._longest_token = longest
        return self._longest_token

    def _embed(self, rows: list[DatasetRow], on_done: OnDone, should_stop: Callable[[], bool]) -> None:
        """Embeddings rows go to a second context on the loaded weights (see :mod:`.llama_embed`).

        Made on the first such rows, so a generation-only worker never pays for it; a model that cannot
        embed (a reranker) fails these rows, not the chunk.
        """
        if self._embedder is None:
            try:
                self._embedder = LlamaEmbedder(self._L, self._model, self.variant, n_threads=self.n_threads)
            except Exception as exc:
                for row in rows:
                    on_done(row, exc)
                return
        self._embedder.generate(rows, on_done, should_stop)

    def _admit(
        self,
        seq_id: int,
        queue: RowQueue,
        ahead: dict[int, list[int] | Exception],
        merger: ChoiceMerger,
        live: dict[int, Seq],
        on_done: OnDone,
    ) -> Seq | None:
        """Start the next servable row in stream ``seq_id``; rows that cannot be served are reported."""
        while queue.rows:
            row = queue.rows.popleft()
            tokens = ahead.pop(id(row), None)
            try:
                lead = merger.leader(row)
                leader = live.get(id(lead)) if lead is not None else None
                if leader is not None:
                    seq = self._start(seq_id, row, leader.prompt, follows=leader)
                else:
                    if tokens is None:
                        tokens = self._row_tokens(row)
                    if isinstance(tokens, Exception):
                        raise tokens
                    seq = self._start(seq_id, row, tokens)
            except Exception as exc:
                on_done(row, exc)
                continue
            live[id(row)] = seq
            return seq
        return None

    def _start(self, seq_id: int, row: DatasetRow, tokens: list[int], follows: Seq | None = None) -> Seq:
        n_prompt, params = len(tokens), row.params
        if n_prompt + 1 > self.n_ctx:
            raise RequestTooLong(f"prompt is {n_prompt} tokens; the model context is {self.n_ctx} per request")
        max_tokens = params.max_tokens if params.max_tokens > 0 else self.n_ctx - n_prompt
        if n_prompt + max_tokens > self.n_ctx:
            raise RequestTooLong(
                f"prompt is {n_prompt} tokens and max_tokens is {max_tokens}; "
                f"the model context is {self.n_ctx} per request"
            )
        stops = list(params.stop)
        mask = self._json_mask(row)
        if row.endpoint in MESSAGE_ENDPOINTS and self._eos != -1 and mask is None:
            # What create_chat_completion adds; a JSON row ends on the token alone, since a string in
            # the JSON may spell the marker as plain text and cutting there would break the JSON.
            stops.append(self._token_text(self._eos))
        text = TextAccumulator(stops)
        cached = 0
        if self._prefix and follows is None:
            shared = min(common_prefix_len(tokens, self._prefix), n_prompt - 1)
            cached = shared if shared >= MIN_SHARED_PREFIX else 0
        seq = Seq(
            seq_id=seq_id,
            row=row,
            prompt=tokens,
            max_tokens=max_tokens,
            sampler=RowSampler(self._L, self._vocab, params, self._n_vocab, mask=mask),
            text=text,
            cached=cached,
            n_past=cached,
            feed=[] if follows is not None else tokens[cached:],
            admitted=time.perf_counter(),
            follows=follows,
        )
        if cached:
            # Cross-stream copy: queued here, done by the next llama_decode before it places any token.
            self._L.llama_memory_seq_cp(self._mem, self._prefix_seq, seq_id, -1, -1)
            if cached < len(self._prefix):
                self._L.llama_memory_seq_rm(self._mem, seq_id, cached, -1)
        return seq

    def _json_mask(self, row: DatasetRow) -> RowMatcher | None:
        if row.params.json_schema is None and row.params.tools is None:
            return None
        if self._constraints is None:
            self._constraints = JsonConstraints(self._L, self._vocab, self._n_vocab)
        return self._constraints.matcher(row.params)

    def _set_prefix(self, prefix: list[int]) -> None:
        """Make the reserved stream hold ``prefix``, re-evaluating only what differs from what it holds.

        An empty choice keeps the previous prefix: rows of this call may still share it (the usual case
        when one job's chunks arrive one generate() call at a time).
        """
        if not prefix or prefix == self._prefix:
            return
        keep = common_prefix_len(prefix, self._prefix)
        L, batch = self._L, self._batch
        assert batch is not None
        L.llama_memory_seq_rm(self._mem, self._prefix_seq, keep, -1)
        self._prefix = prefix[:keep]
        for start in range(keep, len(prefix), self._n_batch):
            chunk = prefix[start : start + self._n_batch]
            n = batch.put(0, chunk, start, self._prefix_seq)
            if L.llama_decode(self._ctx, batch.ready(n)) != 0:
                L.llama_memory_seq_rm(self._mem, self._prefix_seq, -1, -1)
                self._prefix = []
                log.warning("could not evaluate the shared prompt prefix; continuing without it")
                return
            self._prefix = prefix[: start + len(chunk)]

    def close(self) -> None:
        """Free the batch, context and model; safe to call twice."""
        L = getattr(self, "_L", None)
        if L is None:
            return
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        self._batch = None
        if self._ctx:
            L.llama_free(self._ctx)
        self._ctx = None
        if self._model:
            L.llama_model_free(self._model)
        self._model = None

    def __enter__(self) -> LlamaEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _physical_cores() -> int:
    try:
        import psutil

        return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:
        return os.cpu_count() or 1

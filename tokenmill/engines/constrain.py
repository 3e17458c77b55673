"""JSON-schema and tool-call rows on llama.cpp: an llguidance matcher per row over the model's own vocabulary.

Every step a constrained row asks its matcher which tokens may come next (a bitmask over the vocabulary,
tens of microseconds), its logits outside the mask become -inf before the row's sampler chain runs, and
the token chosen is fed back to the matcher. The tokenizer llguidance needs is built from the loaded
vocabulary once per engine, on the first constrained row, so an engine that never sees one pays nothing.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from tokenmill import structured, tool_calls
from tokenmill.engines.sampling import SamplerError
from tokenmill.rows import SamplingParams


class JsonConstraints:
    """The model's llguidance tokenizer and the compiled matcher of each schema seen, copied per row."""

    def __init__(self, llama_cpp: Any, vocab: Any, n_vocab: int) -> None:
        self._tokenizer = _tokenizer(llama_cpp, vocab, n_vocab)
        self.n_vocab = n_vocab
        self._compiled: dict[tuple[str | None, str | None], Any] = {}

    def matcher(self, params: SamplingParams) -> RowMatcher | None:
        """A fresh matcher for one row (its JSON schema, or the tool-call grammar of its tools); None when
        nothing constrains the row; SamplerError when the grammar does not compile for this vocabulary."""
        from llguidance import LLMatcher, LLParserLimits

        key = (params.json_schema, params.tools)
        template = self._compiled.get(key)
        if template is None:
            try:
                grammar = tool_calls.row_grammar(params.json_schema, params.tools)
            except structured.SchemaError as exc:
                raise SamplerError(f"the row's JSON schema cannot be enforced: {exc.message}") from None
            if grammar is None:
                return None
            # Errors name no part of the schema or the text: they may reach a log line.
            limits = LLParserLimits(verbose_errors=False)
            template = LLMatcher(self._tokenizer, grammar, log_level=0, limits=limits)
            if template.is_error():
                raise SamplerError(f"the row's JSON schema cannot be enforced: {_one_line(template.get_error())}")
            if len(self._compiled) >= 64:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[key] = template
        return RowMatcher(template.deep_copy(), self.n_vocab)


def _tokenizer(L: Any, vocab: Any, n_vocab: int) -> Any:
    """llguidance's tokenizer over a llama.cpp vocabulary (as ``llguidance.llamacpp`` builds it, without the
    deprecated llama.cpp call it makes). Control tokens are marked special, so no JSON text can be spelled
    with them; every end-of-generation token (a chat turn's end as well as EOS) may close the JSON."""
    from llguidance import LLTokenizer

    buf = ctypes.create_string_buffer(1024)
    pieces: list[bytes] = []
    ends: list[int] = []
    for token in range(n_vocab):
        n = L.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
        if n < 0:
            raise SamplerError(f"token {token} is longer than {len(buf)} bytes; cannot build the JSON matcher")
        piece = buf.raw[:n]
        attr = L.llama_vocab_get_attr(vocab, token)
        control = attr & L.LLAMA_TOKEN_ATTR_CONTROL
        if control or (attr & L.LLAMA_TOKEN_ATTR_USER_DEFINED and piece[:1] == b"<" and piece[-1:] == b">"):
            piece = b"\xff" + piece
        pieces.append(piece)
        if L.llama_vocab_is_eog(vocab, token):
            ends.append(token)
    tokenize = ctypes.cast(L.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
    return LLTokenizer.from_llamacpp(  # type: ignore[attr-defined]
        tokens=pieces,
        vocab_ptr=vocab,
        tokenize_fptr=tokenize,
        eos_token=ends or int(L.llama_vocab_eos(vocab)),
        slices=None,
    )


class RowMatcher:
    """One row's place in its schema: the tokens allowed next, and the tokens taken so far."""

    def __init__(self, matcher: Any, n_vocab: int) -> None:
        self._matcher = matcher
        self._n_vocab = n_vocab
        self._words = np.zeros((1, (n_vocab + 31) // 32), dtype=np.int32)

    def allowed(self) -> np.ndarray:
        """A boolean per token: may it come next?"""
        words = self._words
        self._matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        if self._matcher.is_error():
            raise SamplerError(f"structured output failed: {_one_line(self._matcher.get_error())}")
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")
        return bits[: self._n_vocab].view(bool)

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise SamplerError(f"structured output failed: {_one_line(self._matcher.get_error())}")


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]

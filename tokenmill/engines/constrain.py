"""JSON-schema rows on llama.cpp: an llguidance matcher per row over the model's own vocabulary.

Every step a constrained row asks its matcher which tokens may come next (a bitmask over the vocabulary,
tens of microseconds), its logits outside the mask become -inf before the row's sampler chain runs, and
the token chosen is fed back to the matcher. The tokenizer llguidance needs is built from the loaded
vocabulary once per engine, on the first constrained row, so an engine that never sees one pays nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tokenmill import structured
from tokenmill.engines.sampling import SamplerError


class JsonConstraints:
    """The model's llguidance tokenizer and the compiled matcher of each schema seen, copied per row."""

    def __init__(self, llama_cpp: Any, vocab: Any, n_vocab: int) -> None:
        from llguidance.llamacpp import lltokenizer_from_vocab

        L = llama_cpp
        # Every end-of-generation token (a chat template's turn end as well as EOS) may close the JSON.
        ends = [t for t in range(n_vocab) if L.llama_vocab_is_eog(vocab, t)]
        self._tokenizer = lltokenizer_from_vocab(vocab, n_vocab=n_vocab, eos_token=ends or None)
        self.n_vocab = n_vocab
        self._compiled: dict[str, Any] = {}

    def matcher(self, schema_text: str) -> RowMatcher:
        """A fresh matcher for one row; SamplerError when the schema does not compile for this vocabulary."""
        from llguidance import LLMatcher, LLParserLimits

        template = self._compiled.get(schema_text)
        if template is None:
            try:
                grammar = structured.grammar(schema_text)
            except structured.SchemaError as exc:
                raise SamplerError(f"the row's JSON schema cannot be enforced: {exc.message}") from None
            # Errors name no part of the schema or the text: they may reach a log line.
            limits = LLParserLimits(verbose_errors=False)
            template = LLMatcher(self._tokenizer, grammar, log_level=0, limits=limits)
            if template.is_error():
                raise SamplerError(f"the row's JSON schema cannot be enforced: {_one_line(template.get_error())}")
            if len(self._compiled) >= 64:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[schema_text] = template
        return RowMatcher(template.deep_copy(), self.n_vocab)


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

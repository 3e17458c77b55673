"""A BERT-family embedding model (safetensors + ``tokenizer.json``) → GGUF, without torch or transformers.

llama.cpp's ``convert_hf_to_gguf.py`` needs torch and transformers for every architecture, gigabytes on a
host that only wants all-MiniLM-L6-v2. This script follows that converter's ``BertModel`` path step by step
(tensor names and types, metadata, vocabulary, special tokens) with numpy alone, and writes through the
``gguf`` package vendored in the same llama.cpp, so its output is byte for byte the reference converter's:
the catalog pins that file's sha256, and a drift is an integrity error, never a silently different model.

It runs as a script in a child interpreter whose path holds that ``gguf-py`` (see
:mod:`tokenmill.models.convert`) and imports nothing from tokenmill. Exit 2 with one line on stderr when the
model is not one it can convert.
"""

from __future__ import annotations

import hashlib
import json
import sys
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np

ARCHITECTURES = ("BertModel", "BertForMaskedLM")
OUTTYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16"}

# The converter's check text: its token ids' sha256 names the pre-tokenizer (get_vocab_base_pre).
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
    "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 "
    "3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785"
    "\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll "
    "make it, 'D you like some tea? We'Ve a'lL"
)
# The WordPiece entries of the converter's table (later entries win there, so bge-small's hash reads
# jina-v2-en). llama.cpp ignores the name for WordPiece vocabularies; an unknown hash writes "default".
WORDPIECE_PRE = {
    "0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f": "jina-v2-en",
    "8e62295832751ca1e8f92f2226f403dea30dc5165e448b5bfa05af5340c64ec7": "bert-bge-large",
    "c7699093ba4255a91e702aa38a596aa81669f3525dae06c2953267dde580f448": "jina-v1-en",
}
_SKIPPED = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")
_WHITE_SPACE = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


class ConvertError(Exception):
    """A model this converter does not handle; the message is the one line the parent shows."""


def _hf_tensors(model_dir: Path) -> Iterator[tuple[str, Any]]:
    """(HF name, gguf's LocalTensor) in the converter's order: parts sorted, names sorted within each part."""
    parts = sorted(p.name for p in model_dir.iterdir() if p.name.startswith("model") and p.suffix == ".safetensors")
    if not parts:
        raise ConvertError(f"{model_dir} has no model*.safetensors")
    for part in parts:
        with gguf.utility.SafetensorsLocal(model_dir / part) as tensors:
            yield from tensors.items()


def _as_float(raw: np.ndarray, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """F16 and F32 as stored; every other float widened to F32, as the converter does."""
    if dtype == "F32":
        return raw.view(np.float32).reshape(shape)
    if dtype == "F16":
        return raw.view(np.float16).reshape(shape)
    if dtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if dtype == "F64":
        return raw.view(np.float64).astype(np.float32).reshape(shape)
    raise ConvertError(f"tensor dtype {dtype} is not a float type this converter reads")


def _gguf_name(hf_name: str, tensor_map: Any) -> str | None:
    """BertModel.filter_tensors then map_tensor_name; None for the tensors an embedding model drops."""
    name = hf_name.removeprefix("bert.")
    if name.endswith(".gamma"):
        name = name[:-6] + ".weight"
    if name.endswith(".beta"):
        name = name[:-5] + ".bias"
    if name in _SKIPPED or name.startswith(("cls.predictions", "cls.seq_relationship")):
        return None
    if name.endswith((".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")):
        return None
    mapped: str | None = tensor_map.get_name(key=name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise ConvertError(f"cannot map tensor {hf_name!r} to a GGUF name")
    return mapped


def _qtype(new_name: str, n_dims: int, ftype: Any) -> Any:
    """The converter's choice: 1-D, norms, position and token-type tables and non-weights stay F32."""
    q = gguf.GGMLQuantizationType
    kept_f32 = {gguf.TENSOR_NAMES[k] + ".weight" for k in (gguf.MODEL_TENSOR.POS_EMBD, gguf.MODEL_TENSOR.TOKEN_TYPES)}
    if n_dims <= 1 or new_name.endswith("_norm.weight") or new_name in kept_f32:
        return q.F32
    if new_name[-7:] not in (".weight", ".lora_a", ".lora_b"):
        return q.F32
    return q.F32 if ftype == gguf.LlamaFileType.ALL_F32 else q.F16


def add_tensors(writer: Any, model_dir: Path, n_layers: int, ftype: Any) -> None:
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layers)
    for hf_name, tensor in _hf_tensors(model_dir):
        new_name = _gguf_name(hf_name, tensor_map)
        if new_name is None:
            continue
        data = _as_float(tensor.mmap_bytes(), tensor.dtype, tensor.shape)
        qtype = _qtype(new_name, len(data.shape), ftype)
        writer.add_tensor(new_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def add_parameters(writer: Any, hparams: dict[str, Any], model_dir: Path, ftype: Any) -> None:
    """TextModel.set_gguf_parameters for the keys a BERT config has, then BertModel's own."""
    writer.add_block_count(hparams["num_hidden_layers"])
    writer.add_context_length(hparams["max_position_embeddings"])
    writer.add_embedding_length(hparams["hidden_size"])
    writer.add_feed_forward_length(hparams["intermediate_size"])
    writer.add_head_count(hparams["num_attention_heads"])
    if "num_key_value_heads" in hparams:
        writer.add_head_count_kv(hparams["num_key_value_heads"])
    if "layer_norm_eps" in hparams:
        writer.add_layer_norm_eps(hparams["layer_norm_eps"])
    if "head_dim" in hparams:
        writer.add_key_length(hparams["head_dim"])
        writer.add_value_length(hparams["head_dim"])
    writer.add_file_type(ftype)
    writer.add_causal_attention(False)
    pooling = _pooling_type(model_dir)
    if pooling is not None:
        writer.add_pooling_type(pooling)


def _pooling_type(model_dir: Path) -> Any:
    """sentence-transformers' pooling module (modules.json), as _try_set_pooling_type reads it."""
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    path = next((m["path"] for m in modules if m["type"].endswith("Pooling")), None)
    if path is None:
        return None
    pooling = json.loads((model_dir / path / "config.json").read_text(encoding="utf-8"))
    kinds = gguf.PoolingType
    if pooling.get("pooling_mode_mean_tokens"):
        return kinds.MEAN
    if pooling.get("pooling_mode_cls_token"):
        return kinds.CLS
    if pooling.get("pooling_mode_lasttoken"):
        return kinds.LAST
    by_name = {"mean": kinds.MEAN, "cls": kinds.CLS, "lasttoken": kinds.LAST}
    if pooling.get("pooling_mode") in by_name:
        return by_name[pooling["pooling_mode"]]
    raise ConvertError("only mean, CLS and last-token pooling are supported")


def _normalize(text: str, normalizer: dict[str, Any]) -> str:
    """tokenizers' BertNormalizer: clean, space out CJK, strip accents, lowercase (each char alone)."""
    if normalizer.get("clean_text", True):
        text = "".join(
            " " if c in _WHITE_SPACE else c
            for c in text
            if not (c in ("\0", "\ufffd") or (c not in "\t\n\r" and unicodedata.category(c).startswith("C")))
        )
    if normalizer.get("handle_chinese_chars", True):
        text = "".join(f" {c} " if any(lo <= ord(c) <= hi for lo, hi in _CJK) else c for c in text)
    lowercase = bool(normalizer.get("lowercase", True))
    strip = normalizer.get("strip_accents")
    if strip if strip is not None else lowercase:
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    if lowercase:
        text = "".join(c.lower() for c in text)
    return text


def _words(text: str) -> list[str]:
    """BertPreTokenizer: split on white space, every punctuation character a word of its own."""
    words: list[str] = []
    current: list[str] = []
    for c in text:
        punct = (c.isascii() and not c.isalnum() and 33 <= ord(c) <= 126) or unicodedata.category(c).startswith("P")
        if c in _WHITE_SPACE or punct:
            if current:
                words.append("".join(current))
                current = []
            if punct:
                words.append(c)
        else:
            current.append(c)
    if current:
        words.append("".join(current))
    return words


def _wordpiece(word: str, vocab: dict[str, int], model: dict[str, Any]) -> list[int]:
    unk = vocab[model.get("unk_token", "[UNK]")]
    prefix = model.get("continuing_subword_prefix", "##")
    if len(word) > model.get("max_input_chars_per_word", 100):
        return [unk]
    ids: list[int] = []
    start = 0
    while start < len(word):
        end = len(word)
        while end > start:
            piece = word[start:end] if start == 0 else prefix + word[start:end]
            if piece in vocab:
                ids.append(vocab[piece])
                break
            end -= 1
        else:
            return [unk]
        start = end
    return ids


def bert_encode(text: str, tokenizer: dict[str, Any], vocab: dict[str, int]) -> list[int]:
    """``tokenizer.encode(text)`` of a BERT fast tokenizer: [CLS] word pieces [SEP], no truncation.

    Enough for the converter's check text, which holds no special-token strings; not a general tokenizer.
    """
    normalizer = tokenizer.get("normalizer") or {}
    if normalizer.get("type") != "BertNormalizer" or (tokenizer.get("model") or {}).get("type") != "WordPiece":
        raise ConvertError("tokenizer.json is not a BERT WordPiece tokenizer")
    ids = [i for w in _words(_normalize(text, normalizer)) for i in _wordpiece(w, vocab, tokenizer["model"])]
    return [vocab["[CLS]"], *ids, vocab["[SEP]"]]


def pre_tokenizer_name(tokenizer: dict[str, Any], vocab: dict[str, int]) -> str:
    digest = hashlib.sha256(str(bert_encode(CHKTXT, tokenizer, vocab)).encode()).hexdigest()
    return WORDPIECE_PRE.get(digest, "default")


def _does_token_look_special(token: str) -> bool:
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def vocab_tokens(tokenizer: dict[str, Any], vocab_size: int | None) -> tuple[list[str], list[int], dict[str, int]]:
    """get_vocab_base: every id's token and type, gaps as [PADn], added tokens CONTROL or USER_DEFINED."""
    vocab: dict[str, int] = dict(tokenizer["model"]["vocab"])
    added = {t["content"]: t for t in tokenizer.get("added_tokens", [])}
    vocab.update({content: t["id"] for content, t in added.items()})
    size = vocab_size if vocab_size is not None else len(vocab)
    if max(vocab.values()) >= size:
        raise ConvertError(f"tokenizer ids reach {max(vocab.values())}, beyond vocab_size {size}")
    reverse = {i: tok for tok, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    kinds = gguf.TokenType
    for i in range(size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(kinds.UNUSED)
            continue
        if token in added and (added[token].get("special") or _does_token_look_special(token)):
            types.append(kinds.CONTROL)
        elif token in added:
            token = token.replace("\u2581", " ")
            types.append(kinds.USER_DEFINED)
        else:
            types.append(kinds.NORMAL)
        tokens.append(token)
    return tokens, types, vocab


def add_vocab(writer: Any, model_dir: Path, hparams: dict[str, Any]) -> None:
    """BertModel.set_vocab: WordPiece pieces in llama.cpp's phantom-space spelling, then special tokens."""
    tokenizer_file = model_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ConvertError(f"{model_dir} has no tokenizer.json")
    tokenizer = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    tokens, types, vocab = vocab_tokens(tokenizer, hparams.get("vocab_size"))
    writer.add_token_type_count(hparams.get("type_vocab_size", 1))
    control = gguf.TokenType.CONTROL
    phantom = [t if k == control else t[2:] if t.startswith("##") else "\u2581" + t
               for t, k in zip(tokens, types, strict=True)]
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer, vocab))
    writer.add_token_list(phantom)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, n_vocab=len(phantom)).add_to_gguf(writer, quiet=True)


def add_metadata(writer: Any, model_dir: Path) -> None:
    """ModelBase.prepare_metadata: name, size label, licence, datasets and tags from the model card."""
    total, shared, expert, expert_count = writer.get_total_parameter_count()
    metadata = gguf.Metadata.load(None, model_dir, None, total)
    if metadata.name is None:
        metadata.name = model_dir.name
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, expert, expert_count)
    writer.add_type(gguf.GGUFType.MODEL)
    metadata.set_gguf_meta_model(writer)


def convert(model_dir: Path, out: Path, outtype: str) -> None:
    hparams = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    arch = (hparams.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise ConvertError(f"architecture {arch} is not a BERT embedding model ({', '.join(ARCHITECTURES)})")
    if outtype not in OUTTYPES:
        raise ConvertError(f"outtype {outtype} is not one of {', '.join(OUTTYPES)}")
    ftype = getattr(gguf.LlamaFileType, OUTTYPES[outtype])
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT])
    add_tensors(writer, model_dir, hparams["num_hidden_layers"], ftype)
    add_metadata(writer, model_dir)
    add_parameters(writer, hparams, model_dir, ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(writer, model_dir, hparams)
    writer.write_header_to_file(path=out)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: bert_gguf.py MODEL_DIR OUT.gguf f16|f32", file=sys.stderr)
        return 2
    try:
        convert(Path(argv[0]), Path(argv[1]), argv[2])
    except (ConvertError, KeyError, ValueError, OSError) as exc:
        print(f"{type(exc).__name__}: {exc}" if not isinstance(exc, ConvertError) else str(exc), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

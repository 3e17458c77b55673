"""A tiny random llama GGUF with SmolLM2's tokenizer and chat template: decoding it costs almost nothing.

One layer, 16 wide, random f32 weights, SmolLM2's 49,152-token vocabulary, merges and chat template
copied from the real SmolLM2 GGUF. ``llama_decode`` then spends its time in the LM head (16 x 49,152
per token) and in copying the logits out, so a run's throughput is what the host costs per token:
building the batch, reading logits, choosing tokens, stop strings, timings, writing results.

Written with the ``gguf`` package vendored in the pinned llama.cpp (the sdist the peer build of
vs_llama_server.py downloads), so reader and writer match the library that loads the file.
Cached under ~/.cache/tokenmill/tiny/; the file's name carries its shape and seed.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np

CACHE = Path.home() / ".cache" / "tokenmill" / "tiny"
EMBED = 16
HEADS = 2  # head size 8
KV_HEADS = 2
FFN = 32
CONTEXT = 8192  # as SmolLM2: the engine caps a row's context at the model's training context
SEED = 25


def smollm2_path() -> Path:
    return Path.home() / ".cache" / "tokenmill" / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_module(peer_root: Path) -> Any:
    """The ``gguf`` package of the pinned llama.cpp, from the sdist the peer build unpacked."""
    tree = next(peer_root.glob("llama_cpp_python-*/vendor/llama.cpp/gguf-py"), None)
    if tree is None:
        raise SystemExit(f"no llama.cpp gguf-py under {peer_root}; build the peer first (vs_llama_server.py)")
    sys.path.insert(0, str(tree))
    import gguf

    return gguf


def tiny_model(peer_root: Path, source: Path | None = None) -> Path:
    """The tiny model's path, written on first use."""
    out = CACHE / f"tiny-llama-{EMBED}w-1l-seed{SEED}.f32.gguf"
    if out.is_file():
        return out
    source = source or smollm2_path()
    if not source.is_file():
        raise SystemExit(f"{source} is missing: the tiny model copies its tokenizer (run `make` first)")
    gguf = gguf_module(peer_root)
    reader = gguf.GGUFReader(str(source))
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(partial), "llama")
    writer.add_name("tokenmill tiny random llama (host-cost benchmark)")
    writer.add_block_count(1)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(EMBED)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(EMBED // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, field in reader.fields.items():
        if name.startswith("tokenizer."):
            _copy_field(writer, gguf, name, field)
    for name, shape in _tensor_shapes(vocab).items():
        writer.add_tensor(name, _weights(name, shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(out)
    return out


def _copy_field(writer: Any, gguf: Any, name: str, field: Any) -> None:
    kind = field.types[0]
    value = field.contents()
    if kind == gguf.GGUFValueType.ARRAY:
        writer.add_key_value(name, value, kind, sub_type=field.types[-1])
    else:
        writer.add_key_value(name, value, kind)


def _tensor_shapes(vocab: int) -> dict[str, tuple[int, ...]]:
    """numpy shapes (rows = output features), as convert_hf_to_gguf writes a llama; output tied to the
    embeddings as in SmolLM2."""
    kv = EMBED // HEADS * KV_HEADS
    return {
        "token_embd.weight": (vocab, EMBED),
        "output_norm.weight": (EMBED,),
        "blk.0.attn_norm.weight": (EMBED,),
        "blk.0.attn_q.weight": (EMBED, EMBED),
        "blk.0.attn_k.weight": (kv, EMBED),
        "blk.0.attn_v.weight": (kv, EMBED),
        "blk.0.attn_output.weight": (EMBED, EMBED),
        "blk.0.ffn_norm.weight": (EMBED,),
        "blk.0.ffn_gate.weight": (FFN, EMBED),
        "blk.0.ffn_up.weight": (FFN, EMBED),
        "blk.0.ffn_down.weight": (EMBED, FFN),
    }


def _weights(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name.endswith("norm.weight"):
        return np.ones(shape, dtype=np.float32)
    rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
    return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)


if __name__ == "__main__":
    peer = Path.home() / ".cache" / "tokenmill" / "peer"
    roots = sorted(p for p in peer.iterdir() if p.is_dir())
    print(tiny_model(roots[-1]))

"""Embeddings on the real models: all-MiniLM-L6-v2 (BERT, the tests' embedding model) and SmolLM2 (mean pooled).

The bodies are checked with the official OpenAI SDK's ``CreateEmbeddingResponse``.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from openai.types import CreateEmbeddingResponse

from tokenmill.engine import EmbeddingResult, Generation
from tokenmill.engines.llama import LlamaEngine
from tokenmill.engines.llama_embed import LlamaEmbedder, load_embedder
from tokenmill.engines.llama_guard import plain_llama
from tokenmill.errors import RequestTooLong
from tokenmill.output import embeddings_body, response_body
from tokenmill.rows import CHAT, EMBEDDINGS, DatasetRow, SamplingParams

pytestmark = pytest.mark.model

CAT = "The cat sits on the mat."
CAT2 = "A cat is sitting on a rug."
STOCKS = "Stock markets fell sharply after the central bank raised interest rates."


def embed_row(cid: str, *inputs: str | tuple[int, ...], fmt: str = "float", dims: int | None = None) -> DatasetRow:
    return DatasetRow(0, cid, EMBEDDINGS, inputs=tuple(inputs), encoding_format=fmt, dimensions=dims)


def run(engine: LlamaEmbedder | LlamaEngine, rows: Sequence[DatasetRow]) -> dict[str, Generation | Exception]:
    results: dict[str, Generation | Exception] = {}

    def on_done(row: DatasetRow, result: Generation | Exception) -> None:
        assert row.custom_id not in results, f"{row.custom_id} reported twice"
        results[row.custom_id] = result

    engine.generate(rows, on_done, lambda: False)
    assert set(results) == {r.custom_id for r in rows}
    return results


def vectors(result: Generation | Exception) -> np.ndarray:
    assert isinstance(result, EmbeddingResult), f"expected embeddings, got {result!r}"
    return np.asarray(result.vectors)


@pytest.fixture(scope="module")
def minilm(minilm_path: Path) -> Iterator[LlamaEmbedder]:
    embedder, close = load_embedder(str(minilm_path), "all-minilm-l6-v2:f16", n_threads=2)
    yield embedder
    close()


def test_minilm_paraphrase_closer_than_unrelated_and_unit_norm(minilm: LlamaEmbedder) -> None:
    v = vectors(run(minilm, [embed_row("a", CAT, CAT2, STOCKS)])["a"])
    assert v.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    paraphrase, unrelated = float(v[0] @ v[1]), float(v[0] @ v[2])
    assert paraphrase > 0.5 > unrelated + 0.3, (paraphrase, unrelated)


def test_same_vectors_as_llama_cpp_python_create_embedding(minilm: LlamaEmbedder, minilm_path: Path) -> None:
    """Packing many inputs into one decode must not change any input's vector."""
    texts = [CAT, CAT2, STOCKS, "short", "A somewhat longer sentence about trains, timetables and delays."]
    rows = [embed_row(f"r{i}", t) for i, t in enumerate(texts)] + [embed_row("all", *texts)]
    got = run(minilm, rows)
    llm = plain_llama(str(minilm_path), embedding=True, n_ctx=512, verbose=False)
    try:
        ref = np.asarray([d["embedding"] for d in llm.create_embedding(texts)["data"]])
    finally:
        llm.close()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    together = vectors(got["all"])
    alone = np.vstack([vectors(got[f"r{i}"]) for i in range(len(texts))])
    np.testing.assert_allclose(together, ref, atol=1e-4)
    np.testing.assert_allclose(alone, ref, atol=1e-4)


def test_token_array_input_matches_its_text(minilm: LlamaEmbedder) -> None:
    tokens = tuple(minilm.tokenize(CAT))
    got = run(minilm, [embed_row("text", CAT), embed_row("tokens", tokens)])
    np.testing.assert_allclose(vectors(got["text"]), vectors(got["tokens"]), atol=1e-5)
    assert isinstance(got["tokens"], EmbeddingResult) and got["tokens"].prompt_tokens == len(tokens)


def test_too_long_input_fails_its_row_alone(minilm: LlamaEmbedder) -> None:
    long_text = " ".join(["word"] * 700)
    got = run(minilm, [embed_row("before", CAT), embed_row("long", CAT2, long_text), embed_row("after", STOCKS)])
    failure = got["long"]
    assert isinstance(failure, RequestTooLong)
    assert "input[1]" in str(failure) and "512" in str(failure)
    assert vectors(got["before"]).shape == (1, 384) and vectors(got["after"]).shape == (1, 384)


def test_unservable_rows_fail_clearly(minilm: LlamaEmbedder) -> None:
    got = run(minilm, [embed_row("vocab", (1, 10**6)), embed_row("dims", CAT, dims=64), embed_row("ok", CAT)])
    assert isinstance(got["vocab"], ValueError) and "vocabulary" in str(got["vocab"])
    assert isinstance(got["dims"], ValueError) and "dimensions=64" in str(got["dims"])
    assert vectors(got["ok"]).shape == (1, 384)
    dims_ok = run(minilm, [embed_row("native", CAT, dims=384)])["native"]
    assert vectors(dims_ok).shape == (1, 384)


def test_many_rows_across_several_decodes(minilm: LlamaEmbedder) -> None:
    """More inputs than one batch holds: every row answered once, vectors in input order."""
    texts = [f"Sentence number {i} talks about {'cats' if i % 2 else 'markets'}." for i in range(300)]
    rows = [embed_row(f"r{i}", *texts[i : i + 30]) for i in range(0, 300, 30)]
    got = run(minilm, rows)
    first = vectors(got["r0"])
    assert first.shape == (30, 384)
    single = vectors(run(minilm, [embed_row("one", texts[7])])["one"])
    # The same input in a batch of 30 or alone: the f16 matmuls sum in another order (by CPU kernel, 1.03e-4
    # apart on one host), so the vectors agree to rounding, not bit for bit.
    np.testing.assert_allclose(first[7], single[0], atol=5e-4)
    assert float(first[7] @ single[0]) > 0.99999


def test_body_validates_with_openai_sdk_and_base64_round_trips(minilm: LlamaEmbedder) -> None:
    float_row, b64_row = embed_row("f", CAT, STOCKS), embed_row("f", CAT, STOCKS, fmt="base64")
    result = vectors_result(run(minilm, [float_row])["f"])
    body = response_body(float_row, result, "all-minilm-l6-v2:f16", "job-1")
    parsed = CreateEmbeddingResponse.model_validate(body)
    assert parsed.object == "list" and parsed.model == "all-minilm-l6-v2:f16"
    assert [d.index for d in parsed.data] == [0, 1] and len(parsed.data[0].embedding) == 384
    assert parsed.usage.prompt_tokens == parsed.usage.total_tokens > 4
    b64 = embeddings_body(b64_row, result, "all-minilm-l6-v2:f16")
    assert isinstance(b64["data"][0]["embedding"], str)
    assert b64["usage"] == body["usage"]
    for as_float, as_text in zip(body["data"], b64["data"], strict=True):
        raw = base64.b64decode(as_text["embedding"])
        decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
        assert list(decoded) == as_float["embedding"]  # exact: both are the same float32 values


def vectors_result(result: Generation | Exception) -> EmbeddingResult:
    assert isinstance(result, EmbeddingResult), f"expected embeddings, got {result!r}"
    return result


def test_smollm2_serves_embeddings_through_the_generation_engine(smollm2_path: Path) -> None:
    """A decoder model's worker embeds too: LlamaEngine hands embeddings rows to a mean-pooled context."""
    with LlamaEngine(smollm2_path, "smollm2", n_seq=2, n_ctx_per_seq=256, n_threads=2) as engine:
        chat = DatasetRow(0, "chat", CHAT, messages=({"role": "user", "content": "Say hi."},),
                          params=SamplingParams(max_tokens=4, temperature=0.0))
        got = run(engine, [embed_row("e", CAT, CAT2, STOCKS), chat])
        assert isinstance(got["chat"], Generation) and not isinstance(got["chat"], EmbeddingResult)
        assert got["chat"].completion_tokens > 0
    v = vectors(got["e"])
    assert v.shape == (3, 576)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2])


def test_batch_size_bounds_the_output_buffer_but_keeps_bert_inputs_whole() -> None:
    from tokenmill.engines.llama_embed import MAX_BATCH, batch_for_vocab

    assert batch_for_vocab(30522) == MAX_BATCH  # BERT: all-MiniLM, BGE, nomic
    assert batch_for_vocab(49152) == 1024  # SmolLM2: 1024 x 49152 floats = 192 MiB
    assert batch_for_vocab(128256) == batch_for_vocab(250037) == 512  # never below a BERT context

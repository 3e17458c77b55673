"""Embeddings throughput: tokenmill's embedder vs ``Llama(embedding=True).create_embedding``, same 512 inputs.

Both run in this one process on the same GGUF and thread count, alternately, best of ``--repeat``:

- ``llama-cpp-python``: ``create_embedding(list_of_512)``, its own batched path (n_batch 512, up to 256
  sequences per decode) with the vectors L2-normalised afterwards as tokenmill's are;
- ``tokenmill``: :class:`~tokenmill.engines.llama_embed.LlamaEmbedder` serving the inputs as embeddings
  rows of ``--per-row`` inputs each, exactly as a worker calls it.

Printed: inputs/s of each, the ratio, and the largest cosine distance between the two vectors of one
input (a check that both computed the same thing). Usage::

    python benchmarks/embeddings.py [--model all-minilm-l6-v2] [--inputs 512] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from tokenmill.config import Settings
from tokenmill.engine import EmbeddingResult, Generation
from tokenmill.engines.llama_embed import load_embedder
from tokenmill.engines.llama_guard import plain_llama
from tokenmill.models.resolve import resolve_model
from tokenmill.rows import EMBEDDINGS, DatasetRow

_WORDS = (  # noqa: SIM905 - a sentence reads better than a list of words
    "the a report shows quarterly revenue grew while costs fell sharply in europe and asia "
    "customers asked about delivery times refunds and the new pricing model for small teams "
    "engineers fixed a memory leak in the parser after users reported slow startup on laptops"
).split()


def make_inputs(n: int, seed: int = 7) -> list[str]:
    """Sentences of 5 to 60 words, the spread of titles, questions and short paragraphs."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 60))).capitalize() + "." for _ in range(n)]


def run_tokenmill(embedder: Any, inputs: list[str], per_row: int) -> tuple[float, np.ndarray]:
    rows = [
        DatasetRow(i // per_row + 1, f"r{i}", EMBEDDINGS, inputs=tuple(inputs[i : i + per_row]))
        for i in range(0, len(inputs), per_row)
    ]
    got: dict[str, Generation | Exception] = {}
    started = time.perf_counter()
    embedder.generate(rows, lambda row, res: got.__setitem__(row.custom_id, res), lambda: False)
    elapsed = time.perf_counter() - started
    vectors: list[list[float]] = []
    for row in rows:
        res = got[row.custom_id]
        if not isinstance(res, EmbeddingResult):
            raise SystemExit(f"row {row.custom_id} failed: {res}")
        vectors.extend(res.vectors)
    return elapsed, np.asarray(vectors)


def run_llama(llm: Any, inputs: list[str]) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    body = llm.create_embedding(inputs)
    vectors = np.asarray([d["embedding"] for d in body["data"]], dtype=np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return time.perf_counter() - started, vectors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="all-minilm-l6-v2", help="catalog name or .gguf path")
    ap.add_argument("--inputs", type=int, default=512)
    ap.add_argument("--per-row", type=int, default=8, help="inputs per embeddings row (tokenmill side)")
    ap.add_argument("--n-batch", type=int, default=None,
                    help="tokens per decode (tokenmill side; default by vocabulary)")
    ap.add_argument("--pack", type=int, default=0, help="tokens packed per decode (tokenmill side; 0: default)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    path = resolve_model(args.model, Settings.from_env().models_dir).path
    inputs = make_inputs(args.inputs)
    llm = plain_llama(str(path), embedding=True, n_ctx=512, n_threads=args.threads,
                      n_threads_batch=args.threads, verbose=False)
    embedder, close = load_embedder(str(path), Path(path).stem, n_batch=args.n_batch, n_threads=args.threads,
                                    pack_tokens=args.pack)
    n_tokens = sum(len(embedder.tokenize(t)) for t in inputs)
    print(f"model {path.name}: {args.inputs} inputs, {n_tokens} tokens, {args.threads} threads, "
          f"n_embd {embedder.n_embd}")
    best_llama = best_tm = float("inf")
    worst = 0.0
    try:
        run_llama(llm, inputs[:16])  # warm both: first-touch page faults, thread pools
        run_tokenmill(embedder, inputs[:16], args.per_row)
        for _ in range(args.repeat):
            t_llama, v_llama = run_llama(llm, inputs)
            t_tm, v_tm = run_tokenmill(embedder, inputs, args.per_row)
            best_llama, best_tm = min(best_llama, t_llama), min(best_tm, t_tm)
            worst = max(worst, float(np.max(1.0 - np.sum(v_llama * v_tm, axis=1))))
    finally:
        close()
        llm.close()
    llama_rate, tm_rate = args.inputs / best_llama, args.inputs / best_tm
    print(f"llama-cpp-python create_embedding: {best_llama:.3f} s  {llama_rate:.1f} inputs/s")
    print(f"tokenmill LlamaEmbedder:           {best_tm:.3f} s  {tm_rate:.1f} inputs/s")
    print(f"speedup {tm_rate / llama_rate:.2f}x (goal >= 1.5x); largest cosine distance between the two: {worst:.2e}")


if __name__ == "__main__":
    main()

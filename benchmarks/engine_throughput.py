"""Generation throughput: the plain sequential llama-cpp-python loop against LlamaEngine's batching.

Every configuration gets the same chat prompts at temperature 0 and reports the tokens it actually
generated (rows may end early on EOS; nothing forces generation past it), divided by wall time including
prompt evaluation. Run on an otherwise idle machine: llama.cpp's worker threads spin, so a busy
neighbour process distorts every figure.

    .venv/bin/python benchmarks/engine_throughput.py [--model NAME|PATH] [--threads N] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

from tokenmill.config import Settings
from tokenmill.engine import Generation
from tokenmill.engines.llama import LlamaEngine
from tokenmill.engines.llama_guard import plain_llama
from tokenmill.models.resolve import resolve_model
from tokenmill.rows import CHAT, DatasetRow, SamplingParams

DEFAULT_MODEL = "smollm2-135m-instruct:q4_1"

# fmt: off
TOPICS = [
    "rivers", "volcanoes", "bread baking", "the moon", "honey bees", "chess openings", "rain forests",
    "glaciers", "jazz", "bicycles", "lighthouses", "coffee", "octopuses", "deserts", "paper making",
    "telescopes", "tides", "owls", "bridges", "tea ceremonies", "coral reefs", "windmills", "maps",
    "origami", "thunderstorms", "libraries", "penguins", "sailing", "clocks", "mushrooms", "kites", "salt",
]
# fmt: on
ASKS = ["Write a short paragraph about {}.", "Give three facts about {}.", "Explain {} to a child."]


def prompts(n: int, max_tokens: int) -> list[DatasetRow]:
    return [
        DatasetRow(
            line=i + 1,
            custom_id=f"row-{i}",
            endpoint=CHAT,
            messages=({"role": "user", "content": ASKS[i % len(ASKS)].format(TOPICS[i % len(TOPICS)])},),
            params=SamplingParams(max_tokens=max_tokens, temperature=0.0),
        )
        for i in range(n)
    ]


def sequential(model: Path, rows: list[DatasetRow], threads: int, flash_attn: bool) -> tuple[int, float]:
    llm = plain_llama(
        str(model), n_ctx=2048, n_threads=threads, n_threads_batch=threads, flash_attn=flash_attn, verbose=False
    )
    started = time.perf_counter()
    tokens = 0
    for row in rows:
        messages = cast(Any, list(row.messages or ()))
        res = cast("dict[str, Any]", llm.create_chat_completion(messages, temperature=0.0,
                                                               max_tokens=row.params.max_tokens))
        tokens += res["usage"]["completion_tokens"]
    elapsed = time.perf_counter() - started
    llm.close()
    return tokens, elapsed


def engine(model: Path, rows: list[DatasetRow], threads: int, n_seq: int, prefix_cache: bool) -> tuple[int, float]:
    eng = LlamaEngine(model, "bench", n_seq=n_seq, n_threads=threads, prefix_cache=prefix_cache)
    done: list[Generation] = []

    def on_done(row: DatasetRow, result: Generation | Exception) -> None:
        if isinstance(result, Exception):
            raise result
        done.append(result)

    started = time.perf_counter()
    eng.generate(rows, on_done, lambda: False)
    elapsed = time.perf_counter() - started
    eng.close()
    assert len(done) == len(rows)
    return sum(g.completion_tokens for g in done), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="catalog name or a local .gguf path")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--n-seq", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--no-prefix-cache", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all configurations; best round reported")
    args = parser.parse_args()
    args.model = resolve_model(args.model, Settings.from_env().models_dir).path
    rows = prompts(args.prompts, args.max_tokens)
    configs: list[tuple[str, Callable[[], tuple[int, float]]]] = [
        (
            f"Llama.create_chat_completion loop (fa={fa})",
            partial(sequential, args.model, rows, args.threads, fa),
        )
        for fa in (False, True)
    ]
    configs += [
        (f"LlamaEngine n_seq={n}", partial(engine, args.model, rows, args.threads, n, not args.no_prefix_cache))
        for n in args.n_seq
    ]
    best: dict[str, tuple[int, float]] = {}
    for _ in range(args.repeat):
        for name, measure in configs:
            tokens, seconds = measure()
            if name not in best or seconds < best[name][1]:
                best[name] = (tokens, seconds)
    print(
        f"{args.prompts} chat prompts, max_tokens={args.max_tokens}, temperature 0, {args.threads} threads, "
        f"best of {args.repeat}"
    )
    print(f"{'configuration':<44} {'tokens':>7} {'seconds':>8} {'gen tok/s':>10}")
    for name, (tokens, seconds) in best.items():
        print(f"{name:<44} {tokens:>7} {seconds:>8.2f} {tokens / seconds:>10.1f}")


if __name__ == "__main__":
    main()

"""Constrained (json_schema) against free rows on the batched engine: generated tok/s of each.

Runs on one loaded engine: 32 free rows alone, 32 json_schema rows alone (llguidance's token mask),
the same schema as GBNF through llama.cpp's grammar sampler (what tokenmill used before, for
comparison), and free and json_schema rows mixed in one call (the free rows' rate in the mix shows what
constrained neighbours cost them). Each set runs ``--repeat`` times, alternating, and its best rate is
kept, which damps a busy host's noise. Rates are the generated tokens of a set of rows divided by the
wall time of the call that served them. The time spent computing and applying the JSON mask is also
measured directly, per constrained token. Greedy decoding, the same prompts for every set. Run on an
otherwise idle machine (llama.cpp's threads spin; neighbours distort every figure).

    .venv/bin/python benchmarks/structured.py [--rows 32] [--max-tokens 64] [--threads N] [--n-seq 16]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from tokenmill.config import Settings
from tokenmill.engine import Generation
from tokenmill.engines.constrain import RowMatcher
from tokenmill.engines.llama import LlamaEngine
from tokenmill.models.resolve import resolve_model
from tokenmill.request_contract import extra_overrides
from tokenmill.rows import CHAT, DatasetRow, SamplingParams

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "topic": {"type": "string", "maxLength": 24},
        "facts": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 3},
        "difficulty": {"enum": ["easy", "medium", "hard"]},
        "score": {"type": "number", "minimum": 0, "maximum": 10},
        "for_children": {"type": "boolean"},
    },
    "required": ["topic", "facts", "difficulty", "score", "for_children"],
    "additionalProperties": False,
}
TOPICS = ["rivers", "volcanoes", "bread", "the moon", "bees", "chess", "glaciers", "jazz"]


def rows(n: int, max_tokens: int, kind: str) -> list[DatasetRow]:
    fmt = {"response_format": {"type": "json_schema", "json_schema": {"name": "facts", "schema": SCHEMA}}}
    extras: dict[str, Any] = extra_overrides(fmt, CHAT, "body.") if kind == "json" else {}
    if kind == "gbnf":
        from llama_cpp.llama_grammar import json_schema_to_gbnf  # llama-cpp-python's converter, as before

        extras = {"grammar": json_schema_to_gbnf(json.dumps(SCHEMA))}
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, **extras)
    out = []
    for i in range(n):
        text = f"Describe {TOPICS[i % len(TOPICS)]} (item {i}) as a JSON object with a few facts."
        out.append(DatasetRow(i, f"{kind}-{i}", CHAT, messages=({"role": "user", "content": text},), params=params))
    return out


def serve(engine: LlamaEngine, batch: list[DatasetRow]) -> tuple[float, dict[str, Generation]]:
    done: dict[str, Generation] = {}

    def on_done(row: DatasetRow, res: Generation | Exception) -> None:
        if isinstance(res, Exception):
            raise SystemExit(f"{row.custom_id} failed: {res}")
        done[row.custom_id] = res

    started = time.perf_counter()
    engine.generate(batch, on_done, lambda: False)
    return time.perf_counter() - started, done


def rate(done: dict[str, Generation], prefix: str, wall: float) -> tuple[int, float]:
    tokens = sum(g.completion_tokens for cid, g in done.items() if cid.startswith(prefix))
    return tokens, tokens / wall


class MaskClock:
    """Time spent in the JSON matcher (mask, and feeding the chosen token back), per constrained token."""

    def __init__(self) -> None:
        self.seconds, self.tokens = 0.0, 0
        allowed, accept = RowMatcher.allowed, RowMatcher.accept

        def timed_allowed(matcher: RowMatcher) -> np.ndarray:
            started = time.perf_counter()
            try:
                return allowed(matcher)
            finally:
                self.seconds += time.perf_counter() - started
                self.tokens += 1

        def timed_accept(matcher: RowMatcher, token: int) -> None:
            started = time.perf_counter()
            try:
                accept(matcher, token)
            finally:
                self.seconds += time.perf_counter() - started

        RowMatcher.allowed = timed_allowed  # type: ignore[method-assign,assignment]
        RowMatcher.accept = timed_accept  # type: ignore[method-assign,assignment]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct:q4_1")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--n-seq", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    path = resolve_model(args.model, Settings.from_env().models_dir).path
    sets = {kind: rows(args.rows, args.max_tokens, kind) for kind in ("free", "json", "gbnf")}
    sets["mixed"] = [r for pair in zip(sets["free"], sets["json"], strict=True) for r in pair]
    best: dict[str, tuple[float, dict[str, Generation]]] = {}
    clock = MaskClock()
    with LlamaEngine(path, args.model, n_ctx_per_seq=512, n_seq=args.n_seq, n_threads=args.threads) as engine:
        serve(engine, sets["free"][:4])  # warm-up
        serve(engine, sets["json"][:4])  # and the matcher's tokenizer, built once per engine
        clock.seconds, clock.tokens = 0.0, 0
        for _ in range(args.repeat):
            for kind, batch in sets.items():
                wall, done = serve(engine, batch)
                if kind not in best or wall < best[kind][0]:
                    best[kind] = (wall, done)
    report(best, clock)


def report(best: dict[str, tuple[float, dict[str, Generation]]], clock: MaskClock) -> None:
    rates = {}
    for kind, label in (("free", "free rows"), ("json", "json_schema"), ("gbnf", "GBNF (before)")):
        wall, done = best[kind]
        tokens, rates[kind] = rate(done, f"{kind}-", wall)
        stopped = sum(g.finish_reason == "stop" for g in done.values())
        valid = sum(_parses(g.text) for g in done.values() if g.finish_reason == "stop")
        print(f"{label:15}: {tokens} tokens in {wall:.1f} s = {rates[kind]:.1f} tok/s", end="")
        print("" if kind == "free" else f" ({stopped} of {len(done)} stop, {valid} of those parse)")
    print(f"ratio          : json_schema/free = {rates['json'] / rates['free']:.2f}", end="")
    print(f", GBNF/free = {rates['gbnf'] / rates['free']:.2f}")
    wall, done = best["mixed"]
    mix_free_tok, _ = rate(done, "free-", wall)
    mix_all_tok, mix_all = rate(done, "", wall)
    print(f"mixed rows     : {mix_all_tok} tokens in {wall:.1f} s = {mix_all:.1f} tok/s", end="")
    print(f" (free rows {mix_free_tok} of them)")
    print(f"mixed vs alone : whole-call rate {mix_all / rates['free']:.2f}x the free-only rate")
    if clock.tokens:
        per_token = 1e6 * clock.seconds / clock.tokens
        print(f"json mask      : {per_token:.0f} us per constrained token ({clock.tokens} tokens)")


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    main()

"""Constrained (json_schema) against free rows on the batched engine: generated tok/s of each.

Three runs on one loaded engine: 32 free rows alone, 32 json_schema rows alone, and the 64 mixed in
one call (the free rows' rate in the mix shows what constrained neighbours cost them). Rates are the
generated tokens of a set of rows divided by the wall time of the call that served them; in the mixed
run each set's rate is its tokens over the whole call. Greedy decoding, the same prompts for both sets.
Run on an otherwise idle machine (llama.cpp's threads spin; neighbours distort every figure).

    .venv/bin/python benchmarks/structured.py [--rows 32] [--max-tokens 64] [--threads N] [--n-seq 16]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from tokenmill.config import Settings
from tokenmill.engine import Generation
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
        "score": {"type": "number"},
        "for_children": {"type": "boolean"},
    },
    "required": ["topic", "facts", "difficulty", "score", "for_children"],
    "additionalProperties": False,
}
TOPICS = ["rivers", "volcanoes", "bread", "the moon", "bees", "chess", "glaciers", "jazz"]


def rows(n: int, max_tokens: int, constrained: bool) -> list[DatasetRow]:
    fmt = {"response_format": {"type": "json_schema", "json_schema": {"name": "facts", "schema": SCHEMA}}}
    extras = extra_overrides(fmt if constrained else {}, CHAT, "body.")
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, **extras)
    kind = "json" if constrained else "free"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct:q4_1")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--n-seq", type=int, default=16)
    args = parser.parse_args()
    path = resolve_model(args.model, Settings.from_env().models_dir).path
    free, constrained = rows(args.rows, args.max_tokens, False), rows(args.rows, args.max_tokens, True)
    with LlamaEngine(path, args.model, n_ctx_per_seq=512, n_seq=args.n_seq, n_threads=args.threads) as engine:
        serve(engine, free[:4])  # warm-up
        wall_free, done_free = serve(engine, free)
        wall_json, done_json = serve(engine, constrained)
        wall_mix, done_mix = serve(engine, [r for pair in zip(free, constrained, strict=True) for r in pair])
    tok_free, tps_free = rate(done_free, "free-", wall_free)
    tok_json, tps_json = rate(done_json, "json-", wall_json)
    mix_free_tok, _ = rate(done_mix, "free-", wall_mix)
    mix_all_tok, mix_all = rate(done_mix, "", wall_mix)
    stopped = sum(g.finish_reason == "stop" for g in done_json.values())
    valid = sum(_parses(g.text) for g in done_json.values() if g.finish_reason == "stop")
    print(f"free rows      : {tok_free} tokens in {wall_free:.1f} s = {tps_free:.1f} tok/s")
    print(f"json_schema    : {tok_json} tokens in {wall_json:.1f} s = {tps_json:.1f} tok/s", end="")
    print(f" ({stopped} of {len(done_json)} stop, {valid} of those parse)")
    print(f"ratio          : constrained/free = {tps_json / tps_free:.2f}")
    print(f"mixed rows     : {mix_all_tok} tokens in {wall_mix:.1f} s = {mix_all:.1f} tok/s", end="")
    print(f" (free rows {mix_free_tok} of them)")
    print(f"mixed vs alone : whole-call rate {mix_all / tps_free:.2f}x the free-only rate")


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    main()

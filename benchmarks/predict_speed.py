"""Predicted against measured tokens/s for every variant present on this host.

Measures each local variant with a plain llama.cpp context (one sequence, greedy, the worker's thread
count) and prints the prediction of :mod:`tokenmill.models.speed` beside it, with the ratio and the
efficiency factors that would make the prediction exact here (to recalibrate the constants).

    .venv/bin/python benchmarks/predict_speed.py [--threads 2] [--tokens 128] [--quantize]

``--quantize`` first makes SmolLM2 Q4_K_M and Q8_0 requantized from its Q4_1 wheel (`models quantize`),
so there is more than one variant to compare with no hub.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from tokenmill.config import Settings
from tokenmill.models.catalog import Family, Variant
from tokenmill.models.quantize import catalog_with_local, quantize
from tokenmill.models.resolve import present, resolve_model
from tokenmill.models.speed import CPU_GEN_EFFICIENCY, CPU_PROMPT_EFFICIENCY, host_speed, predict

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle. " * 6


def measure(path: Path, threads: int, tokens: int) -> tuple[float, float]:
    """(prompt tok/s, generation tok/s) from llama.cpp's own timings, best of two runs."""
    import llama_cpp

    from tokenmill.engines.llama_guard import plain_llama

    llm = plain_llama(str(path), n_ctx=1024, n_threads=threads, verbose=False)
    best = (0.0, 0.0)
    try:
        for _ in range(2):
            llm.reset()
            llama_cpp.llama_perf_context_reset(llm.ctx)
            llm.create_completion(PROMPT, max_tokens=tokens, temperature=0, stream=False)
            perf = llama_cpp.llama_perf_context(llm.ctx)
            prompt_tps = perf.n_p_eval / (perf.t_p_eval_ms / 1000) if perf.t_p_eval_ms else 0.0
            gen_tps = perf.n_eval / (perf.t_eval_ms / 1000) if perf.t_eval_ms else 0.0
            best = (max(best[0], prompt_tps), max(best[1], gen_tps))
    finally:
        llm.close()
    return best


def ensure_requantized(models_dir: Path) -> None:
    src = resolve_model("smollm2-135m-instruct:q4_1", models_dir, fetch=True)
    for target in ("q4_k_m", "q8_0"):
        catalog = catalog_with_local(models_dir)
        if f"{target}_from_q4_1" not in catalog["smollm2-135m-instruct"].quants:
            quantize("smollm2-135m-instruct", target, models_dir, source_path=src.path, source_quant="q4_1")


def local_variants(models_dir: Path) -> list[tuple[Family, Variant, Path]]:
    out = []
    for fam in catalog_with_local(models_dir).values():
        for v in fam.variants:
            here = present(v, models_dir)
            if here is not None:
                out.append((fam, v, here[0]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--quantize", action="store_true", help="make SmolLM2 requantized variants first")
    args = ap.parse_args()
    models_dir = Settings.from_env().models_dir
    if args.quantize:
        ensure_requantized(models_dir)
    t0 = time.perf_counter()
    speed = host_speed(models_dir, refresh=True)
    print(f"probe: {speed.describe()} in {time.perf_counter() - t0:.2f} s")
    print(f"{'variant':<38} {'MiB':>6} {'pred gen':>9} {'meas gen':>9} {'ratio':>6} "
          f"{'pred pp':>8} {'meas pp':>8} {'ratio':>6}")
    gen_factors, pp_factors = [], []
    for fam, v, path in local_variants(models_dir):
        if fam.embedding:  # no generation to time
            continue
        pred = predict(v, fam, speed=speed, threads=args.threads)
        pp, gen = measure(path, args.threads, args.tokens)
        gen_factors.append(CPU_GEN_EFFICIENCY * gen / pred.gen_tps)
        pp_factors.append(CPU_PROMPT_EFFICIENCY * pp / pred.prompt_tps)
        print(f"{v.label:<38} {path.stat().st_size / 2**20:>6.0f} {pred.gen_tps:>9.1f} {gen:>9.1f} "
              f"{gen / pred.gen_tps:>6.2f} {pred.prompt_tps:>8.0f} {pp:>8.0f} {pp / pred.prompt_tps:>6.2f}")
    if gen_factors:
        print(f"factors that would fit this host exactly: CPU_GEN_EFFICIENCY={sum(gen_factors) / len(gen_factors):.2f} "
              f"CPU_PROMPT_EFFICIENCY={sum(pp_factors) / len(pp_factors):.2f}")


if __name__ == "__main__":
    main()

"""A/B of two local variants of one model on the same rows: throughput and agreement side by side.

Makes SmolLM2 Q4_K_M requantized from its Q4_1 wheel when it is missing (`tokenmill models quantize`, no
hub), runs the same 64-row set with `tokenmill run` pinned to each variant, and compares them with the
report's A/B code (`tokenmill report A --ab B` writes the same comparison as HTML).

    .venv/bin/python benchmarks/ab_variants.py [--rows 64] [--max-tokens 48] [--report ab.html]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tokenmill.config import Settings
from tokenmill.models.quantize import catalog_with_local, quantize
from tokenmill.models.resolve import resolve_model
from tokenmill.report import write_report
from tokenmill.report.data import load_report
from tokenmill.store import Store

FAMILY = "smollm2-135m-instruct"
TOPICS = ["rivers", "bread", "volcanoes", "chess", "bees", "glass", "tides", "maps"]


def dataset(path: Path, rows: int, max_tokens: int) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            topic = TOPICS[i % len(TOPICS)]
            body = {"messages": [{"role": "user", "content": f"Write two sentences about {topic} (#{i})."}],
                    "max_tokens": max_tokens, "temperature": 0}
            fh.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": body}) + "\n")
    return path


def run(settings: Settings, data: Path, model: str) -> tuple[str, float]:
    """(job id, wall seconds) of one `tokenmill run` pinned to ``model``."""
    env = {**os.environ, **settings.as_env()}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "tokenmill.cli", "run", str(data), "--model", model, "--no-cache",
                          "-o", str(data.with_suffix(f".{model.split(':')[1]}.jsonl"))],
                         env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    job = next(line.split()[1].rstrip(":") for line in out.stderr.splitlines() if line.startswith("job "))
    return job, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--report", type=Path, default=None, help="also write the A/B report as HTML here")
    args = ap.parse_args()
    base = Settings.from_env()
    if "q4_k_m_from_q4_1" not in catalog_with_local(base.models_dir)[FAMILY].quants:
        src = resolve_model(f"{FAMILY}:q4_1", base.models_dir, fetch=True)
        quantize(FAMILY, "q4_k_m", base.models_dir, source_path=src.path, source_quant="q4_1")
    work = Path(tempfile.mkdtemp(prefix="tm-ab-"))
    settings = base.with_(data_dir=work / ".tokenmill")
    data = dataset(work / "ab.jsonl", args.rows, args.max_tokens)
    a_job, a_wall = run(settings, data, f"{FAMILY}:q4_1")
    b_job, b_wall = run(settings, data, f"{FAMILY}:q4_k_m_from_q4_1")
    store = Store(settings.database_url)
    report = load_report(store, a_job, ab=b_job)
    ab = report.ab
    assert ab is not None
    print(f"{'variant':<40} {'wall s':>7} {'gen tok':>8} {'tok/s':>7} {'decode tok/s p50':>17}")
    for side, wall in ((ab.a, a_wall), (ab.b, b_wall)):
        print(f"{side.model:<40} {wall:>7.1f} {side.generated_tokens:>8} {side.tokens_per_second:>7.1f} "
              f"{side.decode_tps.p50:>17.1f}")
    print(f"agreement: {ab.exact}/{ab.compared} rows identical ({ab.exact_rate:.0%}), "
          f"mean similarity {ab.mean_similarity:.3f}")
    if args.report:
        write_report(store, a_job, output=args.report, ab=b_job)
        print(f"report: {args.report}")


if __name__ == "__main__":
    main()

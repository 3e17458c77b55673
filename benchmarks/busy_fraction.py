"""Engine busy fraction across chunk boundaries: continuous batching across chunks on and off.

    .venv/bin/python benchmarks/busy_fraction.py [--rows 256] [--chunk-size 32] [--n-seq 8] [--max-tokens 64]

`tokenmill run` of the same generation rows (SmolLM2-135M-Instruct, temperature 0, the default variant;
stories cut at max_tokens spread from 8 to --max-tokens, so rows end at different steps)
on the embedded store with one local worker, twice: with the worker claiming the job's next chunk while
its batch drains (the default) and with one chunk per task (TOKENMILL_CHAIN_CHUNKS=0), alternating.
Prints each run's wall time and the job's busy fraction (slots filled / slots available over its decode
steps, from the store, as `tokenmill report` shows it). Issue 15's goal: >= 0.95 on 256 rows, chunk 32.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import TOPICS, tm, tokens_in


def dataset(path: Path, rows: int, max_tokens: int) -> None:
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            prompt = f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]} (variation {i})."
            # lengths spread from 8 to max_tokens: rows end at different steps, as real ones do
            length = 8 + (i * 37) % max(1, max_tokens - 7)
            line = {"id": f"r{i}", "messages": [{"role": "user", "content": prompt}], "max_tokens": length,
                    "temperature": 0}  # fmt: skip
            f.write(json.dumps(line) + "\n")


def run(data: Path, workdir: Path, chain: bool, args: argparse.Namespace) -> tuple[float, int, float | None, int]:
    from tokenmill.config import Settings
    from tokenmill.store import Store
    from tokenmill.store.tables import Job

    data_dir = workdir / ("chain" if chain else "single")
    env = {**os.environ, "TOKENMILL_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1",
           "TOKENMILL_CHAIN_CHUNKS": "1" if chain else "0"}  # fmt: skip
    out = data_dir / "out.jsonl"
    started = time.perf_counter()
    tm("run", str(data), "-o", str(out), "--workers", "1", "--chunk-size", str(args.chunk_size),
       "--n-seq", str(args.n_seq), "--no-cache", env=env)  # fmt: skip
    wall = time.perf_counter() - started
    store = Store(Settings(data_dir=data_dir).database_url)
    try:
        with store.session() as s:
            (job,) = s.query(Job).all()
            busy = job.busy_fraction
            steps = job.decode_steps
    finally:
        store.dispose()
    return wall, tokens_in(out), busy, steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--n-seq", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tm-busy-") as tmp:
        work = Path(tmp)
        data = work / "rows.jsonl"
        dataset(data, args.rows, args.max_tokens)
        print(f"{args.rows} rows, chunk {args.chunk_size}, n_seq {args.n_seq}, max_tokens {args.max_tokens}")
        print(f"{'mode':<34}{'wall s':>8}{'tok':>8}{'tok/s':>8}{'busy':>8}{'steps':>8}")
        for r in range(args.rounds):
            for chain in (True, False):
                wall, tokens, busy, steps = run(data, work / f"r{r}", chain, args)
                mode = "next chunk claimed while draining" if chain else "one chunk per task"
                shown = f"{busy:.3f}" if busy is not None else "n/a"
                print(f"{mode:<34}{wall:>8.1f}{tokens:>8}{tokens / wall:>8.1f}{shown:>8}{steps:>8}")
        print(f"load average {os.getloadavg()[0]:.2f} (2 cores here; other processes slow both modes alike)")


if __name__ == "__main__":
    main()

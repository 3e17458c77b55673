"""The control plane on the embedded store and broker: `tokenmill run`, stub engine, local workers.

    .venv/bin/python benchmarks/control_plane_embedded.py [--rows 20000] [--workers 2] [--chunk-size 250]

The same rows as benchmarks/control_plane.py (which measures Redis + Postgres), run by `tokenmill run` on
SQLite and kombu's SQL transport with the stub engine (no inference, no per-row delay), so what is timed is
tokenmill's own overhead: submit, dispatch, claims, group-committed results, export. Steady results/s is
counted from the stored results' first and last commit times; launch to exit is the whole command.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from control_plane import write_dataset
from sqlalchemy import func, select

from tokenmill.config import Settings
from tokenmill.store import Store
from tokenmill.store.tables import Result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=250)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tm-cp-embedded-") as tmp:
        work = Path(tmp)
        data = work / "rows.jsonl"
        write_dataset(data, args.rows)
        env = {**os.environ, "TOKENMILL_DATA_DIR": str(work / "tm"), "TOKENMILL_ENGINE": "stub",
               "TOKENMILL_STUB_DELAY": "0", "HF_HUB_OFFLINE": "1"}  # fmt: skip
        cmd = [sys.executable, "-m", "tokenmill.cli", "run", str(data), "-o", str(work / "out.jsonl"),
               "--workers", str(args.workers), "--chunk-size", str(args.chunk_size),
               "--model", "smollm2-135m-instruct"]  # fmt: skip
        started = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"tokenmill run failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        store = Store(Settings(data_dir=work / "tm").database_url)
        try:
            with store.session() as s:
                n, first, last = s.execute(
                    select(func.count(), func.min(Result.created_at), func.max(Result.created_at))
                ).one()
        finally:
            store.dispose()
    span = float(last - first)
    print(f"embedded control plane: {args.rows} rows, {args.workers} local workers, chunk size {args.chunk_size}")
    print(f"steady:      {span:6.1f} s  {n / span:8,.0f} results/s  (first result → last result)")
    print(f"end to end:  {wall:6.1f} s  {n / wall:8,.0f} results/s  (launch → exit, results file written)")


if __name__ == "__main__":
    main()

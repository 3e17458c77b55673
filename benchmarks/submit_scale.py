"""Streaming submit at scale: rows/s into Postgres and the submitting process's peak RSS.

    .venv/bin/python benchmarks/submit_scale.py --rows 100000 1000000

Needs the local Postgres (TOKENMILL_TEST_PG, default postgresql://postgres@127.0.0.1:5432/postgres) and
Redis. Each size gets a fresh database; after the submit, one dispatcher pass shows that only a bounded
number of chunks reach the broker.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import psycopg
import redis

ADMIN = os.environ.get("TOKENMILL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def write_dataset(path: Path, rows: int) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            fh.write(json.dumps({"id": f"row-{i}", "messages": [{"role": "user", "content": f"Summarise item {i}."}],
                                 "max_tokens": 32}) + "\n")  # fmt: skip


def peak_rss(proc: subprocess.Popen[bytes]) -> tuple[int, float]:
    """Poll the process tree's RSS until it exits; returns (peak bytes, wall seconds)."""
    started = time.perf_counter()
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    return peak, time.perf_counter() - started


def run(rows: int, workdir: Path) -> dict[str, float]:
    data = workdir / f"rows-{rows}.jsonl"
    write_dataset(data, rows)
    db = f"tm_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    url = ADMIN.rsplit("/", 1)[0] + "/" + db
    r = redis.Redis(db=15)
    r.flushdb()
    env = {**os.environ, "TOKENMILL_DATABASE_URL": url, "TOKENMILL_BROKER_URL": "redis://127.0.0.1:6379/15"}
    tm = [sys.executable, "-m", "tokenmill.cli"]
    try:
        subprocess.run([*tm, "migrate"], env=env, check=True, capture_output=True)
        proc = subprocess.Popen([*tm, "submit", str(data), "--chunk-size", "64"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)  # fmt: skip
        peak, wall = peak_rss(proc)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr.read().decode() if proc.stderr else "submit failed")
        on_broker_after_submit = int(r.llen("tm.smollm2-135m-instruct"))
        sched = subprocess.Popen([*tm, "scheduler"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(4)
        sched.terminate()
        sched.wait()
        on_broker_after_dispatch = int(r.llen("tm.smollm2-135m-instruct"))
    finally:
        r.flushdb()
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        data.unlink()
    return {
        "rows": rows,
        "wall_s": wall,
        "rows_per_s": rows / wall,
        "peak_rss_mb": peak / 2**20,
        "broker_after_submit": on_broker_after_submit,
        "broker_after_dispatch": on_broker_after_dispatch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cols = ("rows", "wall s", "rows/s", "peak RSS MB", "msgs after submit", "after dispatch")
        widths = (10, 8, 9, 12, 18, 15)
        print(" ".join(f"{c:>{w}}" for c, w in zip(cols, widths, strict=True)))
        for n in args.rows:
            res = run(n, Path(tmp))
            print(f"{n:>10} {res['wall_s']:>8.1f} {res['rows_per_s']:>9.0f} {res['peak_rss_mb']:>12.0f} "
                  f"{res['broker_after_submit']:>18} {res['broker_after_dispatch']:>15}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

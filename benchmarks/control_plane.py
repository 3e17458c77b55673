"""The control plane alone: rows/s through Redis + Postgres with an engine that takes no time.

    .venv/bin/python benchmarks/control_plane.py --rows 100000 --workers 2 --chunk-size 250

What it measures is everything but inference: `tokenmill submit` streaming the file into Postgres, the
scheduler enqueueing chunks progressively, workers claiming leases, loading rows, writing one result per
row idempotently and heartbeating, and the scheduler finishing the job. The engine is the stub backend
(``tokenmill worker --engine stub``, ``TOKENMILL_STUB_DELAY=0``), so the figures are an upper bound on
what the store and broker allow; a real model is orders of magnitude slower per row.

Prints submit rows/s, rows/s end to end (first process started → job completed), the steady rate
(first result → last result), and the peak RSS of the scheduler and of each worker, sampled with psutil.
Needs the local Postgres (TOKENMILL_TEST_PG, default postgresql://postgres@127.0.0.1:5432/postgres) and
Redis; uses a fresh database and the Redis db given by --redis-db, both removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import psycopg
import redis

ADMIN = os.environ.get("TOKENMILL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REPO = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"


def write_dataset(path: Path, rows: int) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            row = {
                "id": f"row-{i}",
                "messages": [{"role": "user", "content": f"Summarise item {i}."}],
                "max_tokens": 16,
            }
            fh.write(json.dumps(row) + "\n")


class RssSampler(threading.Thread):
    """Peak RSS per named process, sampled every ``interval`` seconds until stopped."""

    def __init__(self, procs: dict[str, subprocess.Popen[bytes]], interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.procs = {name: psutil.Process(p.pid) for name, p in procs.items()}
        self.peak = dict.fromkeys(procs, 0)
        self.interval = interval
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            for name, ps in self.procs.items():
                try:
                    rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                except psutil.Error:
                    continue
                self.peak[name] = max(self.peak[name], rss)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    data = workdir / "rows.jsonl"
    write_dataset(data, args.rows)
    broker = redis.Redis(db=args.redis_db)
    if broker.dbsize():
        raise SystemExit(f"Redis db {args.redis_db} is in use (not empty); pick another with --redis-db")
    db = f"tm_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    url = ADMIN.rsplit("/", 1)[0] + "/" + db
    env = {
        **os.environ,
        "TOKENMILL_DATABASE_URL": url,
        "TOKENMILL_BROKER_URL": f"redis://127.0.0.1:6379/{args.redis_db}",
        "TOKENMILL_DATA_DIR": str(workdir / ".tokenmill"),
        "PYTHONUNBUFFERED": "1",
    }
    worker_env = {
        **env,
        "TOKENMILL_STUB_DELAY": str(args.stub_delay),
        "HF_HUB_OFFLINE": "1",
    }
    tm = [sys.executable, "-m", "tokenmill.cli"]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = []
    try:
        subprocess.run([*tm, "migrate"], env=env, check=True, capture_output=True, cwd=REPO)
        t0 = time.perf_counter()
        sub = subprocess.run(
            [*tm, "submit", str(data), "--model", MODEL, "--chunk-size", str(args.chunk_size)],
            env=env, capture_output=True, text=True, cwd=REPO,
        )  # fmt: skip
        submit_s = time.perf_counter() - t0
        if sub.returncode != 0:
            raise SystemExit(sub.stderr)
        job = sub.stdout.strip().splitlines()[-1]

        def start(name: str, argv: list[str], penv: dict[str, str]) -> None:
            log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed in finally
            logs.append(log)
            procs[name] = subprocess.Popen([*tm, *argv], env=penv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

        started = time.perf_counter()
        start("scheduler", ["scheduler"], env)
        for i in range(args.workers):
            argv = ["worker", "--engine", "stub", "--model", MODEL, "--threads", "1", "--name", f"bench{i}"]
            start(f"worker{i}", argv, worker_env)
        sampler = RssSampler(procs)
        sampler.start()
        with psycopg.connect(url, autocommit=True) as conn:
            while True:
                state = conn.execute("SELECT state FROM jobs WHERE id = %s", (job,)).fetchone()[0]  # type: ignore[index]
                if state not in ("queued", "running"):
                    break
                dead = [name for name, p in procs.items() if p.poll() is not None]
                if dead:
                    raise SystemExit(f"{', '.join(dead)} exited early; see {workdir}")
                time.sleep(0.5)
            wall = time.perf_counter() - started
            stored, distinct, first, last = conn.execute(
                "SELECT count(*), count(DISTINCT seq), min(created_at), max(created_at) FROM results WHERE job_id = %s",
                (job,),
            ).fetchone()  # type: ignore[misc]
        sampler.done.set()
        sampler.join()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in logs:
            log.close()
        broker.flushdb()
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        data.unlink(missing_ok=True)
    return {
        "state": state,
        "stored": stored,
        "duplicated": stored - distinct,
        "submit_s": submit_s,
        "wall_s": wall,
        "steady_s": (last - first) if first is not None else 0.0,
        "peak_rss": sampler.peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=250)
    parser.add_argument("--stub-delay", type=float, default=0.0, help="Seconds the stub engine spends per row")
    parser.add_argument("--redis-db", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = run(args, Path(tmp))
    n = args.rows
    mib = 2**20
    print(f"control plane: {n} rows, {args.workers} workers, chunk size {args.chunk_size}, "
          f"stub delay {args.stub_delay}s, {psutil.cpu_count()} CPUs")  # fmt: skip
    print(f"job {res['state']}: {res['stored']} results stored, {res['duplicated']} duplicated")
    print(f"submit:      {res['submit_s']:8.1f} s  {n / res['submit_s']:9.0f} rows/s")
    print(f"end to end:  {res['wall_s']:8.1f} s  {n / res['wall_s']:9.0f} rows/s  (processes started → job completed)")
    steady = res["steady_s"]
    if steady:
        print(f"steady:      {steady:8.1f} s  {n / steady:9.0f} rows/s  (first result → last result)")
    for name, peak in res["peak_rss"].items():  # type: ignore[attr-defined]
        print(f"peak RSS {name:<10} {peak / mib:7.0f} MiB")


if __name__ == "__main__":
    main()

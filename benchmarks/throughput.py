"""End-to-end throughput: tokenmill against the plain sequential llama-cpp-python loop.

    .venv/bin/python benchmarks/throughput.py [--rows 32] [--sets gen,doc] [--skip-fleet]

For each dataset, on the same file and the same model (SmolLM2-135M-Instruct Q4_1, temperature 0):
  (a) sequential: one `Llama` and a `create_chat_completion` loop, model load included;
  (b) embedded:   `tokenmill run` (SQLite store + broker, local worker processes), start to exit;
  (c) fleet:      Redis + Postgres, `tokenmill scheduler` + one worker of all the threads, then two
                  workers of half each, from starting them to `status --wait` returning; the rows each
                  worker answered are printed;
  (d) cached:     (b) again on the same file: answered from the result cache.
Datasets are built from text that ships with Python: "gen" = short prompts, up to 160 new tokens;
"doc" = stdlib documentation excerpts of a few hundred tokens to summarise, up to 64 new tokens.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

TOPICS = [
    "a lighthouse keeper", "the first day of spring", "a lost umbrella", "a city built on water",
    "a robot learning to paint", "the history of bread", "a storm at sea", "an old library",
    "a mountain village", "the migration of birds", "a clockmaker's apprentice", "a desert at night",
    "a garden in winter", "a train journey", "a forgotten song", "the invention of paper",
]  # fmt: skip
DOC_MODULES = [
    "json", "csv", "argparse", "textwrap", "collections", "functools", "itertools", "pathlib", "logging",
    "subprocess", "sqlite3", "zipfile", "datetime", "decimal", "fractions", "statistics", "heapq",
    "bisect", "difflib", "shutil", "tempfile", "typing", "dataclasses", "enum", "string", "re",
    "random", "hashlib", "base64", "gzip", "pickle", "copy",
    # rows 33-64 (vs_llama_server.py's 64-row set): other modules, so no prompt repeats
    "os", "sys", "unittest", "http.client", "urllib.parse", "socket", "struct", "io", "time", "shelve",
    "tokenize", "ast", "inspect", "pdb", "timeit", "sched", "uuid", "configparser", "plistlib", "mimetypes",
    "ftplib", "smtplib", "socketserver", "cmd", "doctest", "gc", "trace", "wsgiref", "getopt", "optparse",
    "zlib", "pprint",
]  # fmt: skip
SYSTEM = "You are a helpful assistant."


def build(kind: str, rows: int, path: Path) -> list[dict[str, object]]:
    items: list[dict[str, object]] = []
    for i in range(rows):
        if kind == "gen":
            prompt = f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]} (variation {i})."
            max_tokens = 160
        else:
            import importlib

            mod = importlib.import_module(DOC_MODULES[i % len(DOC_MODULES)])
            text = " ".join((inspect.getdoc(mod) or mod.__name__).split())[:1400]
            prompt = f"Summarise this documentation in two sentences:\n\n{text}"
            max_tokens = 64
        items.append({"id": f"{kind}-{i}", "messages": [{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0})  # fmt: skip
    path.write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
    return items


def sequential(model: str, items: list[dict[str, object]], threads: int) -> tuple[float, int]:
    started = time.perf_counter()
    from tokenmill.engines.llama_guard import plain_llama

    llm = plain_llama(model, n_ctx=2048, n_threads=threads, verbose=False)
    tokens = 0
    for it in items:
        out = llm.create_chat_completion(messages=it["messages"], max_tokens=it["max_tokens"], temperature=0)
        tokens += out["usage"]["completion_tokens"]
    llm.close()
    return time.perf_counter() - started, tokens


def tm(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "tokenmill.cli", *args], env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"tokenmill {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


def tokens_in(results: Path) -> int:
    return sum(json.loads(line)["response"]["body"]["usage"]["completion_tokens"] for line in results.open())


def embedded(data: Path, workdir: Path, threads: int, cached: bool = False) -> tuple[float, int]:
    env = {**os.environ, "TOKENMILL_DATA_DIR": str(workdir / "tm"), "HF_HUB_OFFLINE": "1"}
    out = workdir / ("cached.jsonl" if cached else "embedded.jsonl")
    args = ["run", str(data), "-o", str(out), "--workers", "1", "--threads", str(threads)]
    started = time.perf_counter()
    tm(*args, *([] if cached else ["--no-cache"]), env=env)
    return time.perf_counter() - started, tokens_in(out)


def fleet(data: Path, workdir: Path, workers: int, threads: int) -> tuple[float, int, dict[str, int]]:
    """Wall time, generated tokens, and rows answered by each worker."""
    import psycopg
    import redis

    admin = os.environ.get("TOKENMILL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
    db = f"tm_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    redis.Redis(db=13).flushdb()
    env = {**os.environ, "TOKENMILL_DATABASE_URL": admin.rsplit("/", 1)[0] + "/" + db,
           "TOKENMILL_BROKER_URL": "redis://127.0.0.1:6379/13", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    base = [sys.executable, "-m", "tokenmill.cli"]
    procs: list[subprocess.Popen[bytes]] = []
    out = workdir / "fleet.jsonl"
    try:
        tm("migrate", env=env)
        started = time.perf_counter()
        procs.append(subprocess.Popen([*base, "scheduler"], env=env, stderr=subprocess.DEVNULL))
        for i in range(workers):
            procs.append(subprocess.Popen([*base, "worker", "--name", f"b{i + 1}", "--threads", str(threads)],
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        job = tm("submit", str(data), "--no-cache", env=env).stdout.split()[-1]
        tm("status", job, "--wait", "--interval", "0.2", env=env)
        wall = time.perf_counter() - started
        tm("results", job, "-o", str(out), env=env)
        fleet_rows = json.loads(tm("workers", "--all", "--json", env=env).stdout)
        return wall, tokens_in(out), {w["id"].split(":")[0]: w["rows_done"] for w in fleet_rows}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--sets", default="gen,doc")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--skip-fleet", action="store_true")
    args = parser.parse_args()
    model = subprocess.run([sys.executable, "-m", "tokenmill.cli", "models", "path", "smollm2-135m-instruct"],
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    print(f"model {model}, {args.rows} rows per set, {args.threads} threads", flush=True)
    header = f"{'set':<4} {'mode':<11} {'wall s':>8} {'gen tokens':>10} {'tok/s':>8} {'vs sequential':>14}"
    for kind in args.sets.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            data = work / f"{kind}.jsonl"
            items = build(kind, args.rows, data)
            runs = {"sequential": sequential(model, items, args.threads)}
            runs["embedded"] = embedded(data, work, args.threads)
            shares: dict[str, dict[str, int]] = {}
            if not args.skip_fleet:
                for n in (1, 2):
                    wall, tokens, shares[f"fleet-{n}w"] = fleet(data, work, n, max(1, args.threads // n))
                    runs[f"fleet-{n}w"] = (wall, tokens)
            runs["cached"] = embedded(data, work, args.threads, cached=True)
            print(header)
            base = runs["sequential"][0]
            for mode, (wall, tokens) in runs.items():
                print(f"{kind:<4} {mode:<11} {wall:>8.1f} {tokens:>10} {tokens / wall:>8.1f} {base / wall:>13.2f}x",
                      flush=True)  # fmt: skip
            for mode, rows_by_worker in shares.items():
                print(f"{kind:<4} {mode} rows per worker: " + ", ".join(f"{w} {n}" for w, n in rows_by_worker.items()))
            if "fleet-2w" in runs:
                delta = (runs["fleet-2w"][0] - runs["embedded"][0]) / runs["embedded"][0] * 100
                print(f"{kind:<4} fleet-2w vs embedded wall time: {delta:+.1f}%")
                print(f"{kind:<4} fleet-2w vs fleet-1w wall time: {runs['fleet-1w'][0] / runs['fleet-2w'][0]:.2f}x")
            print(f"{kind:<4} cached re-run speed-up over embedded: {runs['embedded'][0] / runs['cached'][0]:.1f}x\n")


if __name__ == "__main__":
    main()

"""Export at scale: `tokenmill results` (output.export) of a million stored results, rows/s and memory.

    .venv/bin/python benchmarks/export_scale.py --rows 1000000                  # SQLite, kept for reruns
    .venv/bin/python benchmarks/export_scale.py --rows 1000000 --postgres       # the local Postgres too

Bulk-inserts ``--rows`` synthetic requests and succeeded results (a chat body and full timings, as a
worker writes them) into a fresh store, then times :func:`tokenmill.output.export` to a JSONL file and
samples this process's RSS every 50 ms while it runs: the export is flat when the peak above the
pre-export RSS stays a few MiB whatever the row count. The SQLite file is kept under ``--keep`` (default
/tmp/tokenmill-export-scale) so a second run times the export alone; Postgres uses a throwaway database.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import insert, select

from tokenmill.output import export
from tokenmill.store import Store
from tokenmill.store.states import JobState, ResultStatus
from tokenmill.store.tables import Job, RequestRow, Result

ADMIN = os.environ.get("TOKENMILL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
PAGE = 20_000
MIB = 2**20


def _body(i: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-job-{i}", "object": "chat.completion", "created": 1_760_000_000, "model": "smollm2:Q4_1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": f"A short answer number {i}, "
                     "about as long as a summary line."}, "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 31, "completion_tokens": 16, "total_tokens": 47,
                  "prompt_tokens_details": {"cached_tokens": 0}},
    }  # fmt: skip


TIMINGS = {
    "queue_ms": 12.5, "load_ms": 900.0, "prompt_eval_ms": 20.1, "ttft_ms": 25.3, "eval_ms": 80.2, "total_ms": 101.7,
    "tokens_per_second": 199.5, "cached_prompt_tokens": 0, "token_ms": [5.01] * 16,
    "ollama": {"load_duration": 1, "prompt_eval_count": 31, "prompt_eval_duration": 2, "eval_count": 16,
               "eval_duration": 3, "total_duration": 4},
    "llama_server": {"cache_n": 0, "prompt_n": 31, "prompt_ms": 20.1, "prompt_per_second": 1542.3,
                     "predicted_n": 16, "predicted_ms": 80.2, "predicted_per_second": 199.5},
}  # fmt: skip


def populate(store: Store, rows: int) -> str:
    """One job with ``rows`` requests and succeeded results, inserted a page per transaction."""
    job_id = f"bench{uuid.uuid4().hex[:8]}"
    with store.session() as s:
        job = Job(id=job_id, key="k", name="export.jsonl", family="smollm2", queue="tm.smollm2",
                  state=JobState.COMPLETED, total_rows=rows, n_chunks=1, chunk_size=rows)  # fmt: skip
        job.created_at = time.time()
        s.add(job)
    for start in range(0, rows, PAGE):
        seqs = range(start, min(rows, start + PAGE))
        with store.session() as s:
            s.execute(insert(RequestRow), [
                {"job_id": job_id, "seq": i, "chunk_index": 0, "line": i + 1, "custom_id": f"row-{i}",
                 "payload": {"messages": [{"role": "user", "content": f"Summarise item {i}."}], "max_tokens": 16}}
                for i in seqs
            ])  # fmt: skip
            s.execute(insert(Result), [
                {"job_id": job_id, "seq": i, "custom_id": f"row-{i}", "status": ResultStatus.SUCCEEDED,
                 "body": _body(i), "worker_id": "bench:1:abc", "variant": "smollm2:Q4_1", "timings": TIMINGS,
                 "prompt_tokens": 31, "completion_tokens": 16, "attempts": 1, "created_at": 1.0}
                for i in seqs
            ])  # fmt: skip
    return job_id


class RssPeak(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process()
        self.start_rss = self.peak = self.proc.memory_info().rss
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss)


def time_export(store: Store, job_id: str, rows: int, out: Path, label: str) -> None:
    sampler = RssPeak()
    sampler.start()
    t0 = time.perf_counter()
    ok, bad = export(store, job_id, out, None)
    took = time.perf_counter() - t0
    sampler.done.set()
    sampler.join()
    assert (ok, bad) == (rows, 0), (ok, bad)
    size = out.stat().st_size
    grew = (sampler.peak - sampler.start_rss) / MIB
    print(f"export {label}: {rows} rows in {took:6.2f} s = {rows / took:9,.0f} rows/s, {size / MIB:7.0f} MiB "
          f"written; RSS {sampler.start_rss / MIB:.0f} MiB before, peak +{grew:.1f} MiB")  # fmt: skip
    out.unlink()


def sqlite_run(rows: int, keep: Path) -> None:
    keep.mkdir(parents=True, exist_ok=True)
    db = keep / f"export-{rows}.db"
    store = Store(f"sqlite:///{db}")
    store.migrate()
    with store.session() as s:
        job_id = s.scalar(select(Job.id).where(Job.total_rows == rows).limit(1))
    if job_id is None:
        t0 = time.perf_counter()
        job_id = populate(store, rows)
        print(f"inserted {rows} requests + results into SQLite in {time.perf_counter() - t0:.1f} s ({db})")
    time_export(store, job_id, rows, keep / "out.jsonl", "SQLite  ")
    store.dispose()


def postgres_run(rows: int, tmp: Path) -> None:
    import psycopg

    name = f"tm_export_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    store = Store(ADMIN.rsplit("/", 1)[0] + "/" + name)
    try:
        store.migrate()
        t0 = time.perf_counter()
        job_id = populate(store, rows)
        print(f"inserted {rows} requests + results into Postgres in {time.perf_counter() - t0:.1f} s")
        time_export(store, job_id, rows, tmp / "out.jsonl", "Postgres")
    finally:
        store.dispose()
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--postgres", action="store_true", help="Also time the export from the local Postgres")
    parser.add_argument("--keep", type=Path, default=Path(tempfile.gettempdir()) / "tokenmill-export-scale")
    args = parser.parse_args()
    print(f"export scale: {args.rows} rows, {psutil.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    sqlite_run(args.rows, args.keep)
    if args.postgres:
        with tempfile.TemporaryDirectory() as tmp:
            postgres_run(args.rows, Path(tmp))


if __name__ == "__main__":
    main()

"""Hostile batch files through a real embedded `tokenmill serve`: time to `failed`, a poller's latency, RSS.

    .venv/bin/python benchmarks/adversarial_batches.py --examples 40 --scale 5000000 --seed 1

First the GBNF check alone on 2,000 chained rules and on a 256 KiB grammar. Then batches come from
tests/server/adversarial.py's Hypothesis generator (deep nesting, huge strings and
numbers, NUL, invalid UTF-8, giant schemas, grammar bombs), then one batch with every kind at its largest
(``--scale`` bytes) and one of 49,994 lines. Each is uploaded with the openai SDK and must end `failed`
with exactly its poisoned lines as errors; the clock starts when its upload has returned. Meanwhile a
poller asks for the current batch (GET /v1/batches/{id}, one keep-alive connection) every
``--interval`` seconds. Prints the time to `failed` (p50, max), the poller's p50/p99/max and the
server's RSS before, at its peak and after; exits 1 if any batch broke the invariant.
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Literal

import psutil
from hypothesis import HealthCheck, Phase, given, seed, settings
from openai import OpenAI

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from api_poll import PeakRss, free_port  # noqa: E402

from tests.server.adversarial import (  # noqa: E402
    HostileBatch,
    big_grammar,
    chain_grammar,
    every_kind,
    hostile_batches,
    mismatches,
)
from tokenmill import gbnf  # noqa: E402

KEY = "sk-bench"
CHAT: Literal["/v1/chat/completions"] = "/v1/chat/completions"
FINAL = ("failed", "completed", "expired", "cancelled")


def start_server(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TOKENMILL_DATA_DIR": str(data_dir), "TOKENMILL_API_KEYS": KEY, "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    data_dir.mkdir(parents=True, exist_ok=True)
    log = open(data_dir.parent / "serve.log", "wb")  # noqa: SIM115
    argv = [sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(port)]
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, cwd=REPO)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start; see " + str(data_dir.parent / "serve.log"))


class Poller:
    """GET /v1/batches/{id} of the current batch every ``interval`` seconds; latencies in ms."""

    def __init__(self, port: int, interval: float) -> None:
        self.port = port
        self.interval = interval
        self.batch_id: str | None = None
        self.latencies: list[float] = []
        self.errors = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Authorization": f"Bearer {KEY}"}
        while not self.stop.wait(self.interval):
            if self.batch_id is None:
                continue
            started = time.perf_counter()
            try:
                conn.request("GET", f"/v1/batches/{self.batch_id}", headers=headers)
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                ok = False
            self.latencies.append((time.perf_counter() - started) * 1000)
            self.errors += not ok
        conn.close()


def run_one(c: OpenAI, poller: Poller, batch: HostileBatch, timeout: float) -> tuple[float, list[str]]:
    """(seconds from the end of the upload to a final state, what broke the invariant)."""
    f = c.files.create(file=("hostile.jsonl", batch.data), purpose="batch")
    uploaded = time.perf_counter()
    b = c.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    poller.batch_id = b.id
    while b.status not in FINAL and time.perf_counter() - uploaded < timeout:
        time.sleep(0.05)
        b = c.batches.retrieve(b.id)
    took = time.perf_counter() - uploaded
    if b.status != "failed":
        return took, [f"{batch.describe()}: {b.status} after {took:.1f} s"]
    errors = [e.model_dump() for e in (b.errors.data if b.errors else None) or []]
    return took, [f"{batch.describe()}: {p}" for p in mismatches(batch, errors)]


def bench_grammar_check() -> None:
    """The GBNF check alone, on grammars far over the cap (it is linear in their size)."""
    for text, what in ((chain_grammar(2000), "2,000 chained rules"), (big_grammar(256), "a 256 KiB grammar")):
        started = time.perf_counter()
        gbnf.check_grammar(text, max_chars=None)
        print(f"grammar check, {what} ({len(text) / 1024:.0f} KiB): {(time.perf_counter() - started) * 1000:.0f} ms")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--examples", type=int, default=40, help="batches drawn by Hypothesis")
    ap.add_argument("--scale", type=int, default=5_000_000, help="largest hostile value, in bytes")
    ap.add_argument("--max-good", type=int, default=2_000, help="most good lines around the poisoned ones")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between the poller's requests")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds a batch may take to reach a final state")
    args = ap.parse_args()
    bench_grammar_check()
    with tempfile.TemporaryDirectory(prefix="tm-adversarial-") as tmp:
        port = free_port()
        proc = start_server(Path(tmp) / ".tokenmill", port)
        server = psutil.Process(proc.pid)
        poller = Poller(port, args.interval)
        times: list[float] = []
        broken: list[str] = []
        try:
            with OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, timeout=300, max_retries=0) as c:
                rss_before = server.memory_info().rss
                poller.thread.start()

                @seed(args.seed)
                @settings(max_examples=args.examples, deadline=None, database=None, phases=[Phase.generate],
                          suppress_health_check=list(HealthCheck))  # fmt: skip
                @given(batch=hostile_batches(max_good=args.max_good, scale=args.scale))
                def drawn(batch: HostileBatch) -> None:
                    took, problems = run_one(c, poller, batch, args.timeout)
                    times.append(took)
                    broken.extend(problems)

                with PeakRss(proc.pid) as peak:
                    drawn()
                    for batch in (every_kind(args.scale), every_kind(10_000, good=3_570)):
                        took, problems = run_one(c, poller, batch, args.timeout)
                        print(f"{batch.describe()[:90]}…: failed after {took:.2f} s")
                        times.append(took)
                        broken.extend(problems)
                rss_after = server.memory_info().rss
        finally:
            poller.stop.set()
            poller.thread.join(timeout=10)
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    lat = poller.latencies
    print(
        f"batches: {len(times)}; time from upload to failed p50 {pct(times, 0.5):.2f} s, max {max(times):.2f} s\n"
        f"poller: {len(lat)} GET /v1/batches/{{id}}, {poller.errors} non-200; p50 {pct(lat, 0.5):.1f} ms, "
        f"p99 {pct(lat, 0.99):.1f} ms, max {max(lat or [0]):.1f} ms\n"
        f"server RSS: {rss_before / 2**20:.0f} MiB before, peak {peak.peak / 2**20:.0f} MiB, "
        f"{rss_after / 2**20:.0f} MiB after"
    )
    for problem in broken:
        print("BROKEN:", problem[:400])
    sys.exit(1 if broken else 0)


if __name__ == "__main__":
    main()

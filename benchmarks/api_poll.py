"""`tokenmill serve` under load: GET /v1/batches/{id} latency with 200 pollers while a batch runs, and the
upload of a 50,000-line, 100 MB file (wall time and the server's peak RSS).

    .venv/bin/python benchmarks/api_poll.py --pollers 200 --seconds 15 --interval 1.0

One embedded server on 127.0.0.1 (a fresh data dir), its local worker generating on the real model
(or the test stub engine with --stub). Each poller keeps one HTTP/1.1 connection and asks for the same
running batch every ``--interval`` seconds (0: back to back, a closed loop: then latency is mostly the
queue in front of one server process). Bounded: ``--seconds`` of polling, then everything is stopped.
Prints p50/p90/p99/max in ms, requests/s, errors, then the upload figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-bench"
MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(data_dir: Path, port: int, stub: bool) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TOKENMILL_DATA_DIR": str(data_dir), "TOKENMILL_API_KEYS": KEY, "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if stub:
        env.update({"TOKENMILL_ENGINE": "tests.stub_engine:StubEngine", "TOKENMILL_STUB_DELAY": "0.05"})
    log = open(data_dir.parent / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(port)], env=env, stdout=log, stderr=log, cwd=REPO
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start; see " + str(data_dir.parent / "serve.log"))


class PeakRss:
    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self.stop.wait(0.02)

    def __enter__(self) -> PeakRss:
        self.peak = self.proc.memory_info().rss
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def make_big_file(path: Path, lines: int, size: int) -> None:
    pad = max(0, size // lines - 200)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(lines):
            body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "x" * pad}]}
            fh.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
            fh.write("\n")


def bench_upload(base: str, pid: int, lines: int, size: int) -> None:
    from openai import OpenAI

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.jsonl"
        make_big_file(path, lines, size)
        real = path.stat().st_size
        with OpenAI(base_url=base + "/v1", api_key=KEY, timeout=600, max_retries=0) as c, PeakRss(pid) as rss:
            before = rss.proc.memory_info().rss
            t0 = time.perf_counter()
            with open(path, "rb") as fh:
                f = c.files.create(file=fh, purpose="batch")
            wall = time.perf_counter() - t0
        assert f.bytes == real, (f.bytes, real)
    print(
        f"upload: {lines} lines, {real / 1e6:.1f} MB in {wall:.2f} s ({real / 1e6 / wall:.1f} MB/s); "
        f"server RSS {before / 2**20:.0f} MiB before, peak {rss.peak / 2**20:.0f} MiB"
    )


async def poller(
    host: str, port: int, path: str, interval: float, until: float, out: list[float], errs: list[int]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()
    await asyncio.sleep(random.random() * max(interval, 0.01))
    while time.monotonic() < until:
        t0 = time.perf_counter()
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        out.append((time.perf_counter() - t0) * 1000)
        if not head.startswith(b"HTTP/1.1 200"):
            errs.append(1)
        if interval:
            await asyncio.sleep(interval)
    writer.close()


def bench_poll(base: str, port: int, pollers: int, seconds: float, interval: float, rows: int) -> None:
    from openai import OpenAI

    lines = [
        json.dumps(
            {
                "custom_id": f"p{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": MODEL, "max_tokens": 48, "messages": [{"role": "user", "content": f"Count to {i}"}]},
            }
        )
        for i in range(rows)
    ]
    with OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0) as c:
        f = c.files.create(file=("poll.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        deadline = time.monotonic() + 120
        while (b := c.batches.retrieve(b.id)).status != "in_progress" or not (
            b.request_counts and b.request_counts.completed
        ):
            if time.monotonic() > deadline or b.status in ("failed", "completed"):
                raise SystemExit(f"batch did not start generating: {b.status}")
            time.sleep(0.5)
    latencies: list[float] = []
    errors: list[int] = []

    async def main() -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(
            *(
                poller("127.0.0.1", port, f"/v1/batches/{b.id}", interval, until, latencies, errors)
                for _ in range(pollers)
            )
        )

    t0 = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - t0
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))]

    print(
        f"poll: {pollers} pollers every {interval:g} s for {seconds:g} s while batch {b.id} ran: "
        f"{len(latencies)} requests ({len(latencies) / wall:.0f}/s), {len(errors)} non-200; "
        f"p50 {pct(0.5):.1f} ms, p90 {pct(0.9):.1f} ms, p99 {pct(0.99):.1f} ms, max {latencies[-1]:.1f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pollers", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument(
        "--interval", type=float, default=1.0, help="seconds between one poller's requests (0: closed loop)"
    )
    ap.add_argument("--rows", type=int, default=64, help="rows of the batch that runs while polling")
    ap.add_argument("--upload-lines", type=int, default=50_000)
    ap.add_argument("--upload-mb", type=float, default=100.0)
    ap.add_argument("--skip-upload", action="store_true")
    ap.add_argument("--stub", action="store_true", help="the test stub engine instead of the real model")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tm-api-bench-") as tmp:
        port = free_port()
        proc = start_server(Path(tmp) / ".tokenmill", port, args.stub)
        base = f"http://127.0.0.1:{port}"
        try:
            if not args.skip_upload:
                bench_upload(base, proc.pid, args.upload_lines, int(args.upload_mb * 1e6))
            bench_poll(base, port, args.pollers, args.seconds, args.interval, args.rows)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()

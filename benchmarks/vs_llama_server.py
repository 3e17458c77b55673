"""tokenmill against llama-server built from the same llama.cpp, on the same rows, launch to last answer.

    .venv/bin/python benchmarks/vs_llama_server.py [--sets gen,gen128,doc] [--rounds 2] [--quick]

The peer is the llama.cpp tree vendored in the sdist of the llama-cpp-python that pyproject pins: the
sdist comes from the package registry (pip download), `llama-server` and `llama-batched-bench` are built
from it once (cmake + Ninja, -march=native, OpenMP: what pip's own build of the wheel gets) and cached in
~/.cache/tokenmill/peer/<version>/bin. So both sides run the same kernels on the same GGUF file.

For each set, rounds alternate the two sides (which goes first flips each round; this host drifts by
~13 % within an hour) and the best wall time of each side counts:
  llama-server  `-np 16 -c 32768 --cont-batching -fa on -t T`: process launch, /health, every row sent at
                once by 16 client threads to /v1/chat/completions, until the last answer;
  tokenmill     `tokenmill run FILE --workers 1 --threads T --n-seq 16 --no-cache` in a fresh data dir:
                process launch to exit (results file written);
then, once per set, the sequential llama-cpp-python loop (`Llama.create_chat_completion` row by row) and
`llama-batched-bench` at the engine's settings (B 16, 2048 context per sequence, n_batch = n_ubatch 512,
same threads, flash attention on) with the set's mean prompt and completion lengths: the decode floor.
Sets: gen = 32 chat rows, up to 160 new tokens; gen128 = the same kind, 128 rows; doc = 64 stdlib
documentation excerpts to summarise in up to 64 tokens (rows from benchmarks/throughput.py).
ratio = llama-server wall / tokenmill wall: above 1.0x tokenmill is faster. Per run: wall, generated and
prompt tokens, end-to-end tok/s, the work span (first row in work to last answer, start-up excluded) and
its tok/s, and one sequence's decode rate (`seq t/s`: the server's `timings`, tokenmill's `eval_ms`).
Run it on a quiet host: both sides spin 2 OpenMP threads, so a busy neighbour swings every figure.

On a GPU (deploy/gpu/run.sh): `--bin-dir` names a CUDA build of llama-server and llama-batched-bench (the
same tree as the libraries llama-cpp-python loads, through LLAMA_CPP_LIB_PATH), `--n-seq 64` widens both
sides' batch and `--gpu-layers 99` offloads every layer of llama-server's model; tokenmill's worker chooses
its own offload, which the worker line shows.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib
from throughput import build, sequential, tokens_in

from tokenmill.config import Settings
from tokenmill.models.resolve import resolve_model

ROOT = Path(__file__).resolve().parent.parent
N_SEQ = 16
N_CTX = 2048  # per sequence, as the engine's default n_ctx_per_seq
N_BATCH = 512  # the engine's n_batch and n_ubatch
PEER_TOOLS = ("llama-server", "llama-batched-bench")
PEER_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "seed")  # what a row's line sends llama-server
SETS = {"gen": ("gen", 32), "gen128": ("gen", 128), "doc": ("doc", 64)}
GOALS = {"gen": 1.0, "gen128": 1.1, "doc": 1.1}  # issue 15: tokenmill vs llama-server -np 16
SEQ_GOALS = {"gen": 2.0, "doc": 1.25}  # issue 15: tokenmill vs the sequential llama-cpp-python loop


@dataclass
class Run:
    """One side's run of one set: wall from process launch, and the span from the first row in work to
    the last answer (what batching decides, without start-up)."""

    side: str
    wall: float
    gen_tokens: int
    prompt_tokens: int
    work: float | None = None
    seq_tps: float | None = None  # decode tokens per second of one sequence, over its decode time


def per_sequence(tokens_and_ms: list[tuple[int, float]]) -> float | None:
    """Generated tokens over decode time summed over rows, as `tokenmill workers` measures it."""
    ms = sum(m for _, m in tokens_and_ms)
    return sum(t for t, _ in tokens_and_ms) / ms * 1000.0 if ms else None


def pinned_version() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    pin = next(d for d in deps if d.startswith("llama-cpp-python=="))
    return pin.split("==", 1)[1]


def peer_tools(version: str, jobs: int) -> Path:
    """The bin folder holding llama-server and llama-batched-bench of ``version``; built once (~10 min on 2
    cores), then reused. Configured as a standalone llama.cpp with the options llama-cpp-python's own
    CMakeLists sets or inherits for a CPU wheel: GGML_NATIVE on, OpenMP on, BLAS off, curl off."""
    root = Path.home() / ".cache" / "tokenmill" / "peer" / version
    bin_dir = root / "bin"
    if all((bin_dir / t).is_file() for t in PEER_TOOLS):
        return bin_dir
    src = root / f"llama_cpp_python-{version}"
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        pip = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps"]
        subprocess.run([*pip, "--no-binary", ":all:", "-d", str(root)], check=True)
        with tarfile.open(root / f"llama_cpp_python-{version}.tar.gz") as tar:
            tar.extractall(root, filter="data")
    build_dir = root / "build"
    nice = ["nice", "-n", "19"]
    cmake = ["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build_dir), "-G", "Ninja"]
    opts = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_SERVER=ON"]
    opts += ["-DLLAMA_BUILD_TESTS=OFF", "-DBUILD_SHARED_LIBS=OFF"]  # static: the cached binaries stand alone
    print(f"building {', '.join(PEER_TOOLS)} from llama-cpp-python {version}'s llama.cpp ...", flush=True)
    subprocess.run([*nice, *cmake, *opts], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*nice, "cmake", "--build", str(build_dir), f"-j{jobs}", "--target", *PEER_TOOLS], check=True)
    bin_dir.mkdir(exist_ok=True)
    for tool in PEER_TOOLS:
        shutil.copy2(build_dir / "bin" / tool, bin_dir / tool)
    return bin_dir


def no_repack() -> list[str]:
    """``--no-repack`` on a CPU with AMX, as tokenmill's engine loads models there (engines/llama_guard.py):
    the peer is built for this CPU, and ggml's AMX weight repacking crashes it on the first batched
    evaluation of a quantized model (llama.cpp #20824)."""
    cpuinfo = Path("/proc/cpuinfo")
    return ["--no-repack"] if cpuinfo.is_file() and " amx_int8" in cpuinfo.read_text() else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as resp:
        answer: dict[str, Any] = json.load(resp)
        return answer


def wait_healthy(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"llama-server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.05)


def run_peer(
    bin_dir: Path, model: Path, items: list[dict[str, Any]], threads: int, work: Path, n_seq: int, gpu_layers: int
) -> Run:
    """llama-server from launch to its last answer; every row in flight at once, ``n_seq`` at a time."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    argv = [str(bin_dir / "llama-server"), "-m", str(model), "-np", str(n_seq), "-c", str(N_CTX * n_seq)]
    argv += ["--cont-batching", "-fa", "on", "-t", str(threads), "-tb", str(threads), "--no-webui"]
    argv += ["-ngl", str(gpu_layers), *no_repack()]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    log = work / "llama-server.log"
    started = time.perf_counter()
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_healthy(base, proc, log)
        sent = time.perf_counter()

        def ask(it: dict[str, Any]) -> dict[str, Any]:
            body = {"messages": it["messages"], "temperature": 0, **{k: it[k] for k in PEER_FIELDS if k in it}}
            return post(base + "/v1/chat/completions", body)

        with ThreadPoolExecutor(n_seq) as pool:
            answers = list(pool.map(ask, items))
        done = time.perf_counter()
    finally:
        proc.terminate()
        proc.wait()
    gen = sum(a["usage"]["completion_tokens"] for a in answers)
    prompt = sum(a["usage"]["prompt_tokens"] for a in answers)
    timings = [(a["timings"]["predicted_n"], a["timings"]["predicted_ms"]) for a in answers if "timings" in a]
    return Run("llama-server", done - started, gen, prompt, done - sent, per_sequence(timings))


PHASE = re.compile(r"first chunk claimed ([\d.]+) s → finished ([\d.]+) s")


def run_tokenmill(
    model: str, data: Path, threads: int, work: Path, rnd: int | str, n_seq: int
) -> tuple[Run, dict[str, Any]]:
    """`tokenmill run` in a fresh data dir (nothing to resume, nothing cached), launch to exit; and the
    settings its one worker reported."""
    env = {**os.environ, "TOKENMILL_DATA_DIR": str(work / f"tm{rnd}"), "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}
    out = work / f"tokenmill{rnd}.jsonl"
    argv = [sys.executable, "-m", "tokenmill.cli", "run", str(data), "--model", model, "-o", str(out)]
    argv += ["--workers", "1", "--threads", str(threads), "--n-seq", str(n_seq), "--no-cache"]
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"tokenmill run failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    phases = PHASE.search(proc.stdout)
    span = float(phases[2]) - float(phases[1]) if phases else None
    lines = [json.loads(line) for line in out.open(encoding="utf-8")]
    prompt = sum(line["response"]["body"]["usage"]["prompt_tokens"] for line in lines)
    timings = [
        (x["response"]["body"]["usage"]["completion_tokens"], x["tokenmill"]["timings"]["eval_ms"]) for x in lines
    ]
    listing = subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", "workers", "--all", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    worker = json.loads(listing)[0]
    return Run("tokenmill", wall, tokens_in(out), prompt, span, per_sequence(timings)), worker


def batched_bench(
    bin_dir: Path, model: Path, threads: int, npp: int, ntg: int, n_seq: int, gpu_layers: int
) -> dict[str, float]:
    """llama-batched-bench at the engine's settings: B = n_seq, 2048 cells per sequence (not unified),
    n_batch = n_ubatch = 512, the same threads, flash attention on."""
    argv = [str(bin_dir / "llama-batched-bench"), "-m", str(model), "-c", str(N_CTX * n_seq), "-b", str(N_BATCH)]
    argv += ["-ub", str(N_BATCH), "-npp", str(npp), "-ntg", str(ntg), "-npl", str(n_seq), "-t", str(threads)]
    argv += ["-tb", str(threads), "-fa", "on", "--output-format", "jsonl", "-ngl", str(gpu_layers), *no_repack()]
    proc = subprocess.run(argv, capture_output=True, text=True, check=True)
    rows = [json.loads(x) for x in (proc.stdout + proc.stderr).splitlines() if x.startswith("{")]
    return {k: float(rows[-1][k]) for k in ("speed_pp", "speed_tg", "speed", "t")}


def best(runs: list[Run], side: str) -> Run:
    return min((r for r in runs if r.side == side), key=lambda r: r.wall)


def ratio_line(name: str, baseline: float, tokenmill: float, goal: float) -> str:
    """``baseline / tokenmill`` (above 1 tokenmill is faster) next to the issue's goal."""
    ratio = baseline / tokenmill
    verdict = "met" if ratio >= goal else "MISSED"
    return f"{name:<48} {baseline:>7.1f} s / {tokenmill:>6.1f} s = {ratio:>5.2f}x  (goal >= {goal:.2f}x, {verdict})"


def run_line(name: str, r: Run, rnd: int) -> str:
    """One run: wall and end-to-end rate, the work span and its rate, and the per-sequence decode rate."""

    def opt(value: float | None, width: int) -> str:
        return f"{value:>{width}.1f}" if value is not None else f"{'-':>{width}}"

    return (
        f"{name:<7} {rnd:>5} {r.side:<13} {r.wall:>7.1f} {r.gen_tokens:>8} {r.prompt_tokens:>8} "
        f"{r.gen_tokens / r.wall:>9.1f} {opt(r.work, 7)} {opt(r.gen_tokens / r.work if r.work else None, 9)} "
        f"{opt(r.seq_tps, 9)}"
    )


HEADER = (
    f"{'set':<7} {'round':>5} {'side':<13} {'wall s':>7} {'gen tok':>8} {'prompt':>8} {'tok/s':>9} {'work s':>7} "
    f"{'work t/s':>9} {'seq t/s':>9}"
)


def bench_set(
    name: str, args: argparse.Namespace, bin_dir: Path, model_path: Path, report: Callable[[str], None]
) -> list[str]:
    """Alternating rounds of one set, then its floor and its sequential baseline; the summary lines."""
    kind, rows = SETS[name]
    rows = args.rows or rows
    with tempfile.TemporaryDirectory(prefix=f"tm-vs-{name}-") as tmp:
        work = Path(tmp)
        data = work / f"{name}.jsonl"
        items = build(kind, rows, data)
        runs: list[Run] = []
        worker: dict[str, Any] = {}
        for rnd in range(1, args.rounds + 1):
            peer_first = rnd % 2 == 1
            for side in ("peer", "tokenmill") if peer_first else ("tokenmill", "peer"):
                if side == "peer":
                    run = run_peer(bin_dir, model_path, items, args.threads, work, args.n_seq, args.gpu_layers)
                else:
                    run, worker = run_tokenmill(args.model, data, args.threads, work, rnd, args.n_seq)
                runs.append(run)
                report(run_line(name, run, rnd))
        report(
            f"{name:<7} tokenmill's worker: {worker.get('variant')} on {worker.get('device')}, "
            f"n_seq {worker.get('n_seq')}, "
            f"{worker.get('threads')} threads, measured {worker.get('measured_tps')} tok/s per sequence"
        )
        peer, tm = best(runs, "llama-server"), best(runs, "tokenmill")
        lines = [
            ratio_line(
                f"{name}: tokenmill vs llama-server -np {args.n_seq} (best of {args.rounds})",
                peer.wall,
                tm.wall,
                args.goal or GOALS[name],
            )
        ]
        if peer.work and tm.work:
            lines.append(
                f"{name:<7} work span (first row in work → last answer): llama-server {peer.work:.1f} s "
                f"({peer.gen_tokens / peer.work:.1f} tok/s), tokenmill {tm.work:.1f} s "
                f"({tm.gen_tokens / tm.work:.1f} tok/s)"
            )
        npp, ntg = round(tm.prompt_tokens / rows), round(tm.gen_tokens / rows)
        floor = batched_bench(bin_dir, model_path, args.threads, npp, ntg, args.n_seq, args.gpu_layers)
        lines.append(
            f"{name:<7} llama-batched-bench B={args.n_seq} pp {npp} tg {ntg}: decode {floor['speed_tg']:.1f} tok/s, "
            f"prefill {floor['speed_pp']:.1f} tok/s, all {floor['speed']:.1f} tok/s in {floor['t']:.1f} s"
        )
        if name in SEQ_GOALS and not args.no_sequential:
            seq_wall, seq_tokens = sequential(str(model_path), items, args.threads)
            lines.append(
                f"{name:<7} sequential llama-cpp-python loop: {seq_wall:.1f} s, {seq_tokens} tokens, "
                f"{seq_tokens / seq_wall:.1f} tok/s"
            )
            lines.append(ratio_line(f"{name}: tokenmill vs sequential loop", seq_wall, tm.wall, SEQ_GOALS[name]))
        return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="gen,gen128,doc", help=f"comma-separated, of {', '.join(SETS)}")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per set; the best counts")
    parser.add_argument("--quick", action="store_true", help="one round of the 32-row gen set")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--model", default="smollm2-135m-instruct:q4_1", help="catalog name:variant")
    parser.add_argument("--no-sequential", action="store_true", help="skip the sequential llama-cpp-python loop")
    parser.add_argument("--build-jobs", type=int, default=2)
    parser.add_argument("--bin-dir", type=Path, help="llama-server and llama-batched-bench already built here")
    parser.add_argument("--n-seq", type=int, default=N_SEQ, help="sequences decoded together, both sides")
    parser.add_argument("--gpu-layers", type=int, default=0, help="llama-server's -ngl (99: every layer)")
    parser.add_argument("--rows", type=int, help="rows per set instead of the set's own count")
    parser.add_argument("--goal", type=float, help="the ratio to meet, for every set (default: each set's own)")
    args = parser.parse_args()
    if args.quick:
        args.sets, args.rounds = "gen", 1
    names = args.sets.split(",")
    unknown = [n for n in names if n not in SETS]
    if unknown:
        parser.error(f"--sets: unknown set {unknown[0]!r}; choose from {', '.join(SETS)}")
    version = pinned_version()
    bin_dir = args.bin_dir or peer_tools(version, args.build_jobs)
    model_path = resolve_model(args.model, Settings.from_env().models_dir, fetch=False).path
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"llama.cpp of llama-cpp-python {version} ({bin_dir}); model {model_path}")
    print(f"{args.threads} threads, {args.rounds} round(s), load average {load} at start", flush=True)
    print(HEADER, flush=True)
    summary: list[str] = []
    for name in names:
        summary += bench_set(name, args, bin_dir, model_path, lambda line: print(line, flush=True))
    print()
    print("\n".join(summary))
    print(f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()

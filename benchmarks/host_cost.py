"""The host's cost per generated token: tokenmill against llama-server on a tiny random model.

    .venv/bin/python benchmarks/host_cost.py [--rounds 3] [--widths 16,64] [--before /path/to/other/tree]
                                             [--profile]

On a GPU the arithmetic of a decode step shrinks a hundredfold and what decides throughput is the host's
work per token: building the batch, reading logits, choosing tokens, stop strings, timings, the result
writer. This benchmark measures that work here, on a model whose ``llama_decode`` costs almost nothing
but the LM head (benchmarks/tiny_model.py: one layer, 16 wide, random weights, SmolLM2's 49,152-token
vocabulary and chat template; built once and cached).

The same 128 chat rows (short varied prompts, up to 256 tokens; three in four at temperature 0, every
fourth sampled at temperature 0.8, top_k 40, top_p 0.95, its own seed) go through
  llama-server  from the same llama.cpp (vs_llama_server.py's peer build), `-np W`, launch to last answer;
  tokenmill     `tokenmill run FILE --workers 1 --n-seq W --threads T --no-cache`, launch to exit;
  before        (with --before TREE) the same command with PYTHONPATH=TREE: another checkout's code;
alternating (the order rotates each round), at each width W: the best of --rounds, and the ratio of
medians. With random weights a row rarely meets its end token, so rows end at max_tokens; both sides
stop at the end token and at max_tokens alike (llama-server's default; tokenmill has no ignore_eos).
Threads default to 1: the model has no arithmetic worth a second thread, and on a shared host a second
OpenMP thread only adds waits.

Then, per code tree and width, the engine alone (no store, no worker) serves the same rows in-process,
alternating, the fastest of --rounds: host µs per generated token = (wall of generate() - time inside
llama_decode) / generated tokens, the time inside llama_decode summed around each call (the engine's own
counter, SlotUse.host_us_per_token, is printed beside it where the code has one). ``--profile`` adds
cProfile's top entries of that loop (a separate pass: the profiler's own cost stays out of the timings).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

from tiny_model import tiny_model
from vs_llama_server import Run, peer_tools, pinned_version, run_peer, run_tokenmill

ROOT = Path(__file__).resolve().parent.parent
ROWS = 128
MAX_TOKENS = 256
SUBJECTS = [
    "tides", "glaciers", "owls", "bridges", "bread", "comets", "violins", "deserts", "bees", "lighthouses",
    "volcanoes", "maps", "coral", "trains", "paper", "clocks",
]  # fmt: skip
ASKS = ["Tell me about {}.", "Write a poem on {}.", "Explain {} to a child.", "List facts about {}."]


def build_rows(path: Path, rows: int = ROWS, max_tokens: int = MAX_TOKENS) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for i in range(rows):
        ask = ASKS[i % len(ASKS)].format(SUBJECTS[i % len(SUBJECTS)])
        item: dict[str, Any] = {
            "id": f"host-{i}",
            "messages": [{"role": "user", "content": f"{ask} (#{i})"}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        if i % 4 == 3:
            item.update(temperature=0.8, top_k=40, top_p=0.95, seed=i)
        items.append(item)
    path.write_text("".join(json.dumps(it) + "\n" for it in items), encoding="utf-8")
    return items


# -- the engine alone, in a child with the code tree on its path ---------------------------------------


def probe(model: Path, data: Path, n_seq: int, threads: int, profile: bool) -> dict[str, Any]:
    """Serve the rows with the engine in this process; the host's share of the wall time, per token."""
    from tokenmill.engines.llama import LlamaEngine
    from tokenmill.rows import CHAT, DatasetRow, SamplingParams

    rows = []
    for i, line in enumerate(data.read_text(encoding="utf-8").splitlines(), 1):
        it = json.loads(line)
        params = {k: it[k] for k in ("max_tokens", "temperature", "top_k", "top_p", "seed") if k in it}
        sampling = SamplingParams(**params)
        messages = tuple(it["messages"])
        rows.append(DatasetRow(line=i, custom_id=it["id"], endpoint=CHAT, messages=messages, params=sampling))
    engine = LlamaEngine(model, "tiny", n_seq=n_seq, n_threads=threads)
    inside = [0.0]
    real = engine._L
    timed = types.SimpleNamespace(**{k: getattr(real, k) for k in dir(real) if not k.startswith("__")})

    def llama_decode(ctx: Any, batch: Any) -> int:
        started = time.perf_counter()
        try:
            return int(real.llama_decode(ctx, batch))
        finally:
            inside[0] += time.perf_counter() - started

    timed.llama_decode = llama_decode
    engine._L = timed
    tokens = [0]

    def on_done(row: Any, res: Any) -> None:
        if isinstance(res, Exception):
            raise SystemExit(f"row {row.custom_id} failed: {res}")
        tokens[0] += res.completion_tokens

    try:
        steps0 = engine.slot_use.steps
        started = time.perf_counter()
        engine.generate(rows, on_done, lambda: False)
        wall = time.perf_counter() - started
        out: dict[str, Any] = {
            "wall": wall,
            "decode": inside[0],
            "tokens": tokens[0],
            "steps": engine.slot_use.steps - steps0,
            "own": _own_counter(engine.slot_use),
        }
        if profile:
            prof = cProfile.Profile()
            prof.enable()
            engine.generate(rows, lambda row, res: None, lambda: False)
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(14)
            out["profile"] = text.getvalue()
        return out
    finally:
        engine._L = real
        engine.close()


def _own_counter(use: Any) -> float | None:
    """The engine's own host µs per token where it counts them (decode time and loop wall)."""
    host_us = getattr(use, "host_us_per_token", None)
    return float(host_us) if host_us is not None else None


def run_probe(tree: Path, model: Path, data: Path, n_seq: int, threads: int, profile: bool) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    argv = [sys.executable, __file__, "--probe", json.dumps([str(model), str(data), n_seq, threads, profile])]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"engine probe ({tree}) failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


# -- the end-to-end rounds -----------------------------------------------------------------------------


def one_run(side: str, tree: Path | None, args: argparse.Namespace, ctx: dict[str, Any], rnd: int, width: int) -> Run:
    if side == "llama-server":
        return run_peer(ctx["bin"], ctx["model"], ctx["items"], args.threads, ctx["work"], width, 0)
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(tree)
    try:
        run, _ = run_tokenmill(str(ctx["model"]), ctx["data"], args.threads, ctx["work"], f"{side}{width}-{rnd}", width)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    run.side = side
    return run


def bench_width(width: int, sides: dict[str, Path | None], args: argparse.Namespace, ctx: dict[str, Any]) -> list[str]:
    runs: list[Run] = []
    order = list(sides)
    for rnd in range(1, args.rounds + 1):
        for side in order:
            run = one_run(side, sides[side], args, ctx, rnd, width)
            runs.append(run)
            tps = run.gen_tokens / run.wall
            work = f"{run.work:>7.2f} {run.gen_tokens / run.work:>9.1f}" if run.work else f"{'-':>7} {'-':>9}"
            print(f"{width:>5} {rnd:>5} {side:<13} {run.wall:>7.2f} {run.gen_tokens:>8} {tps:>9.1f} {work}", flush=True)
        order = order[1:] + order[:1]
    return summarise(width, runs, list(sides), args.rounds) + engine_lines(width, sides, args, ctx)


def summarise(width: int, runs: list[Run], sides: list[str], rounds: int) -> list[str]:
    """Each side's best and median run against llama-server's, and the same for the work spans."""

    def rate(r: Run) -> float:
        return r.gen_tokens / r.wall

    best = {s: max((r for r in runs if r.side == s), key=rate) for s in sides}
    median = {s: statistics.median(rate(r) for r in runs if r.side == s) for s in sides}
    span = {s: min((r.work for r in runs if r.side == s and r.work), default=None) for s in sides}
    peer = best["llama-server"]
    lines = [
        f"width {width}, best of {rounds}: llama-server {rate(peer):,.0f} tok/s ({peer.wall:.2f} s), "
        f"median {median['llama-server']:,.0f}"
    ]
    for side in sides[1:]:
        run = best[side]
        line = (
            f"  {side:<10} {rate(run):>8,.0f} tok/s ({run.wall:.2f} s) = {rate(run) / rate(peer):.2f}x llama-server"
            f" (medians: {median[side] / median['llama-server']:.2f}x)"
        )
        peer_span, own_span = span["llama-server"], span[side]
        if peer_span and own_span:
            line += f"; work span (start-up excluded) {peer_span / own_span:.2f}x"
        lines.append(line)
    return lines


def engine_lines(width: int, sides: dict[str, Path | None], args: argparse.Namespace, ctx: dict[str, Any]) -> list[str]:
    """The engine alone per code tree, alternating, the fastest of --rounds (and one profiled pass)."""
    trees = {side: tree for side, tree in sides.items() if tree is not None}
    probes: dict[str, list[dict[str, Any]]] = {side: [] for side in trees}
    order = list(trees)
    for _ in range(args.rounds):
        for side in order:
            probes[side].append(run_probe(trees[side], ctx["model"], ctx["data"], width, args.threads, False))
        order = order[1:] + order[:1]
    lines = []
    for side, tree in trees.items():
        p = min(probes[side], key=lambda x: x["wall"])
        host_us = (p["wall"] - p["decode"]) / p["tokens"] * 1e6
        own = f"; the engine's own counter {p['own']:.1f} µs" if p.get("own") is not None else ""
        lines.append(
            f"  {side:<10} engine alone: {p['tokens'] / p['wall']:,.0f} tok/s, host {host_us:.1f} µs/token, "
            f"llama_decode {p['decode'] / p['tokens'] * 1e6:.1f} µs/token over {p['steps']} steps{own}"
        )
        if args.profile:
            prof = run_probe(tree, ctx["model"], ctx["data"], width, args.threads, True)["profile"]
            lines.append(f"  cProfile of {side}'s loop at width {width} (by own time):\n{prof}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per width; the best counts")
    parser.add_argument("--widths", default="16,64", help="sequences decoded together (-np / --n-seq)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--before", type=Path, help="another tokenmill tree to run alongside, e.g. main's")
    parser.add_argument("--profile", action="store_true", help="cProfile's top entries of the engine's loop")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        model, data, n_seq, threads, profile = json.loads(args.probe)
        print(json.dumps(probe(Path(model), Path(data), n_seq, threads, profile)))
        return
    version = pinned_version()
    bin_dir = peer_tools(version, 2)
    model = tiny_model(bin_dir.parent)
    sides: dict[str, Path | None] = {"llama-server": None, "tokenmill": ROOT}
    if args.before:
        sides["before"] = args.before.resolve()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"tiny model {model}; llama-server of llama-cpp-python {version}")
    print(f"{args.rows} rows x up to {args.max_tokens} tokens, {args.threads} thread(s), load average {load}")
    head = f"{'width':>5} {'round':>5} {'side':<13} {'wall s':>7} {'gen tok':>8} {'tok/s':>9}"
    print(f"{head} {'work s':>7} {'work t/s':>9}", flush=True)
    summary: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tm-host-cost-") as tmp:
        work = Path(tmp)
        os.chdir(work)  # `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH
        data = work / "rows.jsonl"
        items = build_rows(data, args.rows, args.max_tokens)
        ctx = {"bin": bin_dir, "model": model, "items": items, "work": work, "data": data}
        for width in (int(w) for w in args.widths.split(",")):
            summary += bench_width(width, sides, args, ctx)
    print()
    print("\n".join(summary))
    print(f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()

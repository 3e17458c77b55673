"""Start-up of `tokenmill run`: a 4-row, 1-token job (real model, one worker), phase by phase.

    .venv/bin/python benchmarks/startup.py [--runs 3] [--baseline /path/to/other/checkout]

Each run is a fresh data folder (no resume, no result cache), timed from outside: launch is just before
the process starts, exit when it has been reaped. The phases in between come from the run's own store:

  worker spawned   the local worker's process was started (from the run's phases line, 0.1 s steps)
  stored           the job's row was written (the dataset validated and stored)
  worker ready     the worker registered (model loaded, its queues known)
  claimed          the first chunk was leased to the worker
  finished         the job was marked finished
  exit             `tokenmill run` exited (outputs written, workers stopped)

Prints every run and each phase's best of N. With --baseline, runs alternate between this checkout and
the other one (its code first on PYTHONPATH), and the ratios of the best claims and totals are printed: compare on the
same machine in the same call, since a shared host's load moves every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHASES = ("worker spawned", "stored", "worker ready", "claimed", "finished", "exit")


def dataset(folder: Path) -> Path:
    path = folder / "four.jsonl"
    with path.open("w") as fh:
        for i in range(4):
            fh.write(json.dumps({"custom_id": f"r{i}", "prompt": f"Say the number {i}.", "max_tokens": 1}) + "\n")
    return path


def one_run(code: Path, data: Path, model: str) -> dict[str, float]:
    """Seconds from launch to each phase of one fresh `tokenmill run`."""
    with tempfile.TemporaryDirectory(prefix="tm-startup-") as tmp:
        env = {**os.environ, "PYTHONPATH": str(code), "COLUMNS": "200"}
        cmd = [sys.executable, "-m", "tokenmill.cli", "--data-dir", tmp, "run", str(data), "--model", model,
               "--workers", "1", "-o", f"{tmp}/out.jsonl"]  # fmt: skip
        launch = time.time()
        # cwd: `-m` puts the working directory first on sys.path, ahead of PYTHONPATH
        proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=300, check=False)
        exited = time.time()
        if proc.returncode != 0:
            raise SystemExit(f"run failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        marks: dict[str, float | None] = {**_store_marks(Path(tmp) / "tokenmill.db"), "exit": exited}
        spawned = re.search(r"workers spawned ([\d.]+) s", proc.stdout)
        marks["worker spawned"] = launch + float(spawned.group(1)) if spawned else None
        return {name: t - launch for name in PHASES if (t := marks.get(name)) is not None}


def _store_marks(db: Path) -> dict[str, float]:
    con = sqlite3.connect(db)
    try:
        created, finished = con.execute("SELECT created_at, finished_at FROM jobs").fetchone()
        (ready,) = con.execute("SELECT min(started_at) FROM workers").fetchone()
        (claimed,) = con.execute("SELECT min(started_at) FROM chunks").fetchone()
    finally:
        con.close()
    return {"stored": created, "worker ready": ready, "claimed": claimed, "finished": finished}


def _line(label: str, phases: dict[str, float]) -> str:
    return f"{label:<10}" + "".join(f"{phases[p]:>15.2f}" if p in phases else f"{'-':>15}" for p in PHASES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--baseline", type=Path, help="another checkout to alternate with (its code on PYTHONPATH)")
    args = parser.parse_args()
    codes = {"this": REPO, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    with tempfile.TemporaryDirectory() as tmp:
        data = dataset(Path(tmp))
        one_run(REPO, data, args.model)  # warm-up: page cache, the model file, bytecode
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in codes}
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; seconds from launch")
        print(f"{'':<10}" + "".join(f"{p:>15}" for p in PHASES))
        for i in range(args.runs):
            for name, code in codes.items():
                phases = one_run(code, data, args.model)
                runs[name].append(phases)
                print(_line(f"{name} {i + 1}", phases), flush=True)
    # Each phase's best on its own: one slow decode on a loaded host must not hide a faster start-up.
    best = {name: {p: min(r[p] for r in rs if p in r) for p in PHASES if any(p in r for r in rs)}
            for name, rs in runs.items()}  # fmt: skip
    for name, phases in best.items():
        print(_line(f"best {name}", phases))
    if "baseline" in best:
        for phase in ("claimed", "exit"):
            ratio = best["this"][phase] / best["baseline"][phase]
            print(f"{phase}, best of {args.runs}: this {best['this'][phase]:.2f} s, baseline "
                  f"{best['baseline'][phase]:.2f} s, ratio {ratio:.2f}")  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()

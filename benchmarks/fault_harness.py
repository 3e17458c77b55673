"""Seeded fault schedules against a real fleet, each ending in the exactly-once check.

    .venv/bin/python benchmarks/fault_harness.py --minutes 15              # long mode: schedules until time runs out
    .venv/bin/python benchmarks/fault_harness.py --seed 7 --schedules 1    # replay one schedule

Each schedule, drawn from its seed: a fresh Postgres database and Redis database, a scheduler and 2-3
`tokenmill worker` processes (the stub engine with a per-row delay, or with ``--real`` the real SmolLM2), one
job, and a timeline of faults: kill -9 or SIGTERM of any worker or the scheduler, Postgres or Redis
unreachable for everyone (refused, as when the server is down, or silent, as when packets are dropped) for up
to ``--max-outage`` seconds, one worker cut off from Postgres or Redis, a worker restarted with its clock off by
up to ±5 minutes (libfaketime), cancel of the job and retry a few seconds later, and a poison row that kills
the process generating it. Processes that exit are started again, as a supervisor would (fault_fleet.py).

After the faults every path heals; a cancelled job is retried; the harness waits for the job to finish and
checks the invariant: every row in exactly one of the output and error files of `tokenmill results`, every
failure with its reason, the job's counts equal to its rows, no `completed` job with a failed or missing
row, and (from the job's state polled all along) no final state changed except by a retry, no acknowledged
cancel undone. It prints one line per schedule and "N schedules, M faults, K rows: X lost, Y duplicated";
a failing schedule prints its seed and the command that replays it, and keeps its process logs.
Needs the local Postgres (TOKENMILL_TEST_PG) and Redis, and libfaketime for the clock faults.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis
from fault_fleet import FINAL, MODEL, Fleet, History, pythonpath, verify

from tokenmill.config import Settings
from tokenmill.store import Store

ADMIN = os.environ.get("TOKENMILL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
KINDS = ("kill9", "sigterm", "pg_down", "redis_down", "partition", "clock", "cancel")
POISON = "POISON-ROW"
POLL = 0.2


@dataclass
class Fault:
    at: float  # seconds after the fleet started
    kind: str
    target: str = ""  # a slot: "scheduler", "w0", ...
    seconds: float = 0.0  # how long an outage lasts; for a cancel, how long until the retry
    mode: str = ""  # outages: refuse | silent; partition: pg/refuse, redis/silent, ...
    offset: float = 0.0  # clock faults: the worker's new clock offset

    def __str__(self) -> str:
        detail = {"kill9": self.target, "sigterm": self.target, "clock": f"{self.target} {self.offset:+.0f}s",
                  "cancel": f"retry +{self.seconds:.0f}s"}.get(self.kind)  # fmt: skip
        if detail is None:
            detail = f"{self.target + ' ' if self.target else ''}{self.mode} {self.seconds:.0f}s"
        return f"{self.at:.0f}s {self.kind} {detail}"


@dataclass
class Schedule:
    seed: int
    real: bool
    workers: int
    rows: int
    chunk: int
    delay: float
    span: float
    poison: int | None
    offsets: list[float]
    faults: list[Fault] = field(default_factory=list)

    @property
    def n_faults(self) -> int:
        return len(self.faults) + (self.poison is not None) + sum(1 for o in self.offsets if o)


def draw(seed: int, *, real: bool, span: float, max_outage: float, faults: tuple[int, int]) -> Schedule:
    """The whole schedule from ``seed``: the fleet, the job, and each fault's time, kind and target."""
    rng = random.Random(seed)
    workers = 2 if real else rng.choice((2, 3))
    delay = 0.0 if real else round(rng.uniform(0.04, 0.15), 3)
    rows = 96 if real else max(64, min(3000, int(span * workers / delay)))
    names = [f"w{i}" for i in range(workers)]
    sch = Schedule(
        seed=seed, real=real, workers=workers, rows=rows, chunk=rng.choice((4, 8)) if real else rng.choice((4, 8, 16)),
        delay=delay, span=span, poison=None if real or rng.random() < 0.3 else rng.randrange(rows),
        offsets=[round(rng.uniform(-300, 300)) if rng.random() < 0.25 else 0.0 for _ in names],
    )  # fmt: skip
    kinds = rng.sample(KINDS, len(KINDS))  # every kind once before any twice
    for i in range(rng.randint(*faults)):
        kind = kinds[i] if i < len(kinds) else rng.choice(KINDS)
        f = Fault(at=round(rng.uniform(1.0, span), 1), kind=kind)
        if kind in ("kill9", "sigterm"):
            f.target = rng.choice([*names, "scheduler"])
        elif kind in ("pg_down", "redis_down"):
            f.seconds, f.mode = round(rng.uniform(2.0, max_outage), 1), rng.choice(("refuse", "silent"))
        elif kind == "partition":
            f.target, f.seconds = rng.choice(names), round(rng.uniform(2.0, max_outage), 1)
            f.mode = f"{rng.choice(('pg', 'redis'))}/{rng.choice(('refuse', 'silent'))}"
        elif kind == "clock":
            f.target, f.offset = rng.choice(names), float(round(rng.uniform(-300, 300)))
        elif kind == "cancel":
            f.seconds = round(rng.uniform(1.0, 8.0), 1)
        sch.faults.append(f)
    sch.faults.sort(key=lambda f: f.at)
    return sch


class Run:
    """One schedule against one fresh fleet: start, hurt, heal, check."""

    def __init__(self, sch: Schedule, args: argparse.Namespace, tmp: Path) -> None:
        self.sch, self.args, self.tmp = sch, args, tmp
        self.db_name = f"tm_faults_{uuid.uuid4().hex[:10]}"
        self.db_url = ADMIN.rsplit("/", 1)[0] + "/" + self.db_name
        self.redis_url = f"redis://127.0.0.1:6379/{args.redis_db}"
        settings = Settings(
            data_dir=tmp / ".tokenmill", database_url=self.db_url, broker_url=self.redis_url,
            models_dir=Path(args.models_dir), lease_seconds=args.lease, heartbeat_seconds=1.0, dispatch_interval=0.2,
            max_chunk_attempts=args.max_chunk_attempts, engine="llama" if sch.real else "stub",
        )  # fmt: skip
        self.env = settings.as_env()
        self.history = History()
        self.job = ""
        self.threads: list[threading.Thread] = []
        self.fired: list[str] = []

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.env, "PYTHONPATH": pythonpath()}
        return subprocess.run([sys.executable, "-m", "tokenmill.cli", *args], env=env,
                              capture_output=True, text=True, timeout=timeout, cwd=self.tmp)  # fmt: skip

    def setup(self) -> Fleet:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        redis.Redis.from_url(self.redis_url).flushdb()
        store = Store(self.db_url)
        store.migrate()
        store.dispose()
        data = self.tmp / "rows.jsonl"
        with open(data, "w", encoding="utf-8") as fh:
            for i in range(self.sch.rows):
                text = f"Give one word for {i}." + (f" {POISON}" if i == self.sch.poison else "")
                row = {"id": f"r{i}", "prompt": text, "max_tokens": 16 if self.sch.real else 4, "temperature": 0.5}
                fh.write(json.dumps(row) + "\n")
        done = self.cli("submit", str(data), "--model", MODEL, "--chunk-size", str(self.sch.chunk))
        if done.returncode != 0:
            raise RuntimeError(f"submit failed: {done.stderr.strip()}")
        self.job = self.history.job = done.stdout.strip().splitlines()[-1]
        fleet = Fleet(self.tmp, self.db_url, self.redis_url, self.env)
        fleet.add("scheduler", ["scheduler"], {})
        engine = ["--n-seq", "4", "--n-ctx", "512"] if self.sch.real else ["--engine", "stub"]
        stub = {"TOKENMILL_STUB_DELAY": str(self.sch.delay), "TOKENMILL_STUB_CRASH": POISON}
        for i, offset in enumerate(self.sch.offsets):
            args = ["worker", "--model", MODEL, *engine, "--threads", "1", "--name", f"w{i}"]
            fleet.add(f"w{i}", args, {} if self.sch.real else stub, offset)
        return fleet

    def fire(self, fleet: Fleet, f: Fault) -> None:
        self.fired.append(str(f))
        if f.kind in ("kill9", "sigterm"):
            fleet.signal(f.target, signal.SIGKILL if f.kind == "kill9" else signal.SIGTERM)
        elif f.kind in ("pg_down", "redis_down"):
            fleet.cut(list(fleet.slots), f.kind.split("_")[0], f.seconds, f.mode)
        elif f.kind == "partition":
            service, mode = f.mode.split("/")
            fleet.cut([f.target], service, f.seconds, mode)
        elif f.kind == "clock":
            fleet.slots[f.target].offset = f.offset
            fleet.signal(f.target, signal.SIGTERM)  # started again by the supervisor, on the new clock
        elif f.kind == "cancel":
            self.op("cancel")
            retry = threading.Timer(f.seconds, self.op, args=("retry",))
            retry.start()
            self.threads.append(retry)

    def op(self, kind: str) -> None:
        t = threading.Thread(target=self.history.run_op, args=(kind, lambda: self.cli(kind, self.job)))
        t.start()
        self.threads.append(t)

    def state(self, conn: psycopg.Connection[Any]) -> str:
        row = conn.execute("SELECT state FROM jobs WHERE id = %s", (self.job,)).fetchone()
        return str(row[0]) if row else "missing"

    def drive(self, fleet: Fleet, conn: psycopg.Connection[Any]) -> str:
        """The fault window, then the heal: every path open, a cancelled job retried, wait for the end."""
        t0 = time.monotonic()
        pending = list(self.sch.faults)
        while time.monotonic() - t0 < self.sch.span + 0.5:
            now = time.monotonic()
            while pending and pending[0].at <= now - t0:
                self.fire(fleet, pending.pop(0))
            fleet.supervise(now)
            self.history.observe(now, self.state(conn))
            time.sleep(POLL)
        fleet.heal_all()
        for t in self.threads:
            t.join(timeout=120)
        deadline = time.monotonic() + self.args.recover
        retried = False
        while time.monotonic() < deadline:
            now = time.monotonic()
            fleet.supervise(now)
            state = self.state(conn)
            self.history.observe(now, state)
            if state == "cancelled" and not retried:
                retried = True
                self.history.run_op("retry", lambda: self.cli("retry", self.job))
            elif state in FINAL and state != "cancelled":
                return state
            time.sleep(POLL)
        return self.state(conn)

    def execute(self) -> dict[str, Any]:
        started = time.monotonic()
        fleet = self.setup()
        try:
            with psycopg.connect(self.db_url, autocommit=True) as conn:
                state = self.drive(fleet, conn)
        finally:
            fleet.stop()
        out, err = self.tmp / "out.jsonl", self.tmp / "err.jsonl"
        exported = self.cli("results", self.job, "-o", str(out), "--errors", str(err))
        status = self.cli("status", self.job, "--json")
        ids = [f"r{i}" for i in range(self.sch.rows)]
        if exported.returncode != 0 or status.returncode != 0:
            problem = f"results/status failed: {(exported.stderr + status.stderr).strip()[:300]}"
            v = verify(ids, state, _empty(out), _empty(err), {})
            v.problems.append(problem)
        else:
            v = verify(ids, state, out, err, json.loads(status.stdout.strip().splitlines()[-1]))
        if state not in FINAL or state == "cancelled":
            v.problems.append(f"not finished {self.args.recover:.0f}s after the faults ended")
        v.problems += self.history.violations
        crashes = {n: s.exits for n, s in fleet.slots.items() if s.exits}
        return {"schedule": asdict(self.sch), "faults": self.fired, "verdict": asdict(v), "ok": v.ok,
                "notes": fleet.notes, "exits": crashes, "seconds": round(time.monotonic() - started, 1),
                "ops": [(o.kind, o.rc, o.output[-120:]) for o in self.history.ops]}  # fmt: skip

    def cleanup(self) -> None:
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        redis.Redis.from_url(self.redis_url).flushdb()


def _empty(path: Path) -> Path:
    if not path.exists():
        path.write_text("")
    return path


def replay_command(sch: Schedule, args: argparse.Namespace) -> str:
    kind = "--real 1 --schedules 0" if sch.real else "--real 0 --schedules 1"
    return (f"python benchmarks/fault_harness.py --seed {sch.seed} {kind} --span {args.span:g} "
            f"--max-outage {args.max_outage:g} --faults {args.faults} --lease {args.lease:g} "
            f"--max-chunk-attempts {args.max_chunk_attempts}")  # fmt: skip


def run_one(sch: Schedule, args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"faults-{sch.seed}-"))
    run = Run(sch, args, tmp)
    try:
        report = run.execute()
    except Exception as exc:  # a harness that cannot even set up says so, with the seed
        report = {"schedule": asdict(sch), "faults": run.fired, "ok": False, "verdict": None,
                  "error": f"{type(exc).__name__}: {exc}"}  # fmt: skip
    finally:
        run.cleanup()
    report["logs"] = str(tmp)
    if report["ok"] and not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def describe(report: dict[str, Any], args: argparse.Namespace) -> str:
    sch = report["schedule"]
    head = (f"seed {sch['seed']} ({'smollm2' if sch['real'] else 'stub'}, {sch['workers']} workers, {sch['rows']} rows"
            f"{', poison row' if sch['poison'] is not None else ''}"
            f"{', clocks ' + ' '.join(f'{o:+.0f}s' for o in sch['offsets']) if any(sch['offsets']) else ''}): "
            f"{'; '.join(report['faults'])}")  # fmt: skip
    v = report.get("verdict")
    if v is None:
        return f"{head}\n  ERROR {report.get('error')}"
    codes = ", ".join(f"{k} {n}" for k, n in sorted(v["failure_codes"].items()))
    codes = f" ({codes})" if codes else ""
    line = (f"{head}\n  → {v['state']}, {v['succeeded']} answered, {v['failed']} failed{codes}"
            f", {len(v['lost'])} lost, {len(v['duplicated'])} duplicated, {report['seconds']:.0f}s")  # fmt: skip
    for note in report.get("notes", []):
        line += f"\n  note: {note}"
    if not report["ok"]:
        line += "\n  FAILED: " + "; ".join(v["problems"] + [f"lost {v['lost'][:10]}"] * bool(v["lost"]))
        line += f"\n  replay: {replay_command(Schedule(**{**sch, 'faults': []}), args)}\n  logs: {report['logs']}"
    return line


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=int(time.time()) % 100000, help="seed of the first schedule")
    p.add_argument("--schedules", type=int, default=1000, help="stub-engine schedules (bounded by --minutes)")
    p.add_argument("--real", type=int, default=1, help="schedules on the real model, after the stub ones")
    p.add_argument("--minutes", type=float, default=15.0, help="start no schedule after this long")
    p.add_argument("--span", type=float, default=60.0, help="seconds of faults per schedule")
    p.add_argument("--max-outage", type=float, default=60.0, help="longest outage of a service or path, seconds")
    p.add_argument("--faults", default="6-12", help="faults per schedule, as MIN-MAX")
    p.add_argument("--lease", type=float, default=60.0, help="TOKENMILL_LEASE_SECONDS of the fleet (the default's)")
    p.add_argument("--max-chunk-attempts", type=int, default=5, help="TOKENMILL_MAX_CHUNK_ATTEMPTS of the fleet")
    p.add_argument("--recover", type=float, default=180.0, help="seconds allowed to finish after the faults")
    p.add_argument("--redis-db", type=int, default=12)
    p.add_argument("--models-dir", default=str(Path.home() / ".cache" / "tokenmill" / "models"))
    p.add_argument("--report", type=Path, help="write every schedule's outcome here as JSON")
    p.add_argument("--keep", action="store_true", help="keep the logs of schedules that passed too")
    args = p.parse_args()
    lo, _, hi = args.faults.partition("-")
    bounds = (int(lo), int(hi or lo))
    end = time.monotonic() + args.minutes * 60
    # The real model's schedules first, so a run that runs out of time still has them.
    plan = [(args.seed + j, True) for j in range(args.real)] + [(args.seed + args.real + i, False)
                                                                for i in range(args.schedules)]  # fmt: skip
    reports: list[dict[str, Any]] = []
    for seed, real in plan:
        if time.monotonic() > end and reports:
            break
        sch = draw(seed, real=real, span=args.span, max_outage=min(args.max_outage, args.span), faults=bounds)
        reports.append(run_one(sch, args))
        print(describe(reports[-1], args), flush=True)
    return summarize(reports, args)


def summarize(reports: list[dict[str, Any]], args: argparse.Namespace) -> int:
    verdicts = [r["verdict"] for r in reports if r.get("verdict")]
    faults = sum(Schedule(**{**r["schedule"], "faults": []}).n_faults + len(r["faults"]) for r in reports)
    rows = sum(v["rows"] for v in verdicts)
    lost = sum(len(v["lost"]) for v in verdicts)
    duplicated = sum(len(v["duplicated"]) for v in verdicts)
    failing = [r["schedule"]["seed"] for r in reports if not r["ok"]]
    print(f"{len(reports)} schedules, {faults} faults, {rows} rows: {lost} lost, {duplicated} duplicated"
          + (f"; failing seeds {failing}" if failing else ""))  # fmt: skip
    if args.report:
        args.report.write_text(json.dumps(reports, indent=1))
    return 1 if failing else 0


if __name__ == "__main__":
    raise SystemExit(main())

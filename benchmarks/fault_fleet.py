"""The fleet the fault harness (fault_harness.py) runs and hurts: processes, the paths to the services, a verdict.

Each process slot (the scheduler, each worker) reaches Postgres and Redis through TCP proxies of its own
(tests/reliability/proxy.py), so one path can be cut (a worker partitioned from the store) or all of them (the
store or the broker down) without touching the machine's services. A slot whose process exits is started
again after a moment, as a supervisor would, with the clock offset the schedule gave it (libfaketime, as in
tests/reliability/test_clock_skew.py). The operator's commands (submit, cancel, retry, results, status) reach
the services directly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.reliability.proxy import PausableProxy  # noqa: E402

MODEL = "smollm2-135m-instruct"
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
SKEW_SHIM = REPO / "tests" / "reliability" / "skewclock"
FINAL = ("completed", "completed_with_errors", "cancelled")
ACTIVE = ("queued", "running")
RESTART_AFTER = 0.5  # seconds between a process exiting and its supervisor starting it again
STOP_GRACE = 20.0  # a SIGTERM'd process past this is killed (and noted: a warm shutdown should be quick)


def skew_env(offset: float) -> dict[str, str]:
    """A wall clock ``offset`` seconds off, the monotonic clock true (see tests/reliability/skewclock)."""
    if not offset:
        return {}
    return {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME": f"{offset:+.0f}s",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_DONT_RESET": "1",
        "PYTHONPATH": pythonpath(SKEW_SHIM),
    }


def pythonpath(*first: Path) -> str:
    """This checkout's code first (an installed tokenmill elsewhere must not answer for it)."""
    return os.pathsep.join([*map(str, first), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


@dataclass
class Cut:
    """One proxy's outage: until when, and how (``refuse``: the server is down; ``silent``: packets dropped)."""

    until: float
    mode: str


@dataclass
class Link:
    """A slot's way to one service, and the outage on it, if any."""

    proxy: PausableProxy
    cut: Cut | None = None

    def cut_for(self, now: float, seconds: float, mode: str) -> None:
        if self.cut is not None:  # already cut: the outage lasts until the later end, as it began
            self.cut.until = max(self.cut.until, now + seconds)
            return
        self.cut = Cut(now + seconds, mode)
        if mode == "refuse":
            self.proxy.drop()
        else:
            self.proxy.pause()

    def heal_if_due(self, now: float) -> None:
        if self.cut is not None and now >= self.cut.until:
            self.cut = None
            self.proxy.resume()


@dataclass
class Slot:
    name: str
    argv: list[str]
    env: dict[str, str]
    pg: Link
    redis: Link
    offset: float = 0.0
    proc: subprocess.Popen[bytes] | None = None
    exited_at: float | None = None
    term_at: float | None = None
    starts: int = 0
    exits: list[int] = field(default_factory=list)


class Fleet:
    """A scheduler and workers on one Postgres database and one Redis database, each through its own proxies."""

    def __init__(self, tmp: Path, db_url: str, redis_url: str, settings_env: dict[str, str]) -> None:
        self.tmp = tmp
        self.db_url = db_url
        self.redis_url = redis_url
        self.base_env = {**os.environ, **settings_env, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                         "PYTHONPATH": pythonpath()}  # fmt: skip
        self.slots: dict[str, Slot] = {}
        self.notes: list[str] = []
        self._logs: list[IO[bytes]] = []
        (tmp / "logs").mkdir(parents=True, exist_ok=True)

    def add(self, name: str, args: list[str], env: dict[str, str], offset: float = 0.0) -> Slot:
        pg = PausableProxy(("127.0.0.1", _port(self.db_url, 5432)))
        rd = PausableProxy(("127.0.0.1", _port(self.redis_url, 6379)))
        slot_env = {
            **env,
            "TOKENMILL_DATABASE_URL": _with_port(self.db_url, pg.port),
            "TOKENMILL_BROKER_URL": _with_port(self.redis_url, rd.port),
        }
        argv = [sys.executable, "-m", "tokenmill.cli", *args]
        slot = Slot(name, argv, slot_env, Link(pg), Link(rd), offset)
        self.slots[name] = slot
        self.start(slot)
        return slot

    def start(self, slot: Slot) -> None:
        log = open(self.tmp / "logs" / f"{slot.name}-{slot.starts}.log", "wb")  # noqa: SIM115
        self._logs.append(log)
        env = {**self.base_env, **slot.env, **skew_env(slot.offset)}
        slot.proc = subprocess.Popen(slot.argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp,
                                     start_new_session=True)  # fmt: skip
        slot.starts += 1
        slot.exited_at = slot.term_at = None

    def signal(self, name: str, sig: int) -> bool:
        """Send ``sig`` to the slot's process (its whole group); False if it is not running right now."""
        slot = self.slots[name]
        if slot.proc is None or slot.proc.poll() is not None:
            return False
        try:
            os.killpg(slot.proc.pid, sig)
        except ProcessLookupError:
            return False
        if sig == signal.SIGTERM:
            slot.term_at = time.monotonic()
        return True

    def supervise(self, now: float, restart: bool = True) -> None:
        """Restart what exited; kill what ignored SIGTERM too long; heal the paths whose outage is over."""
        for slot in self.slots.values():
            slot.pg.heal_if_due(now)
            slot.redis.heal_if_due(now)
            proc = slot.proc
            if proc is None:
                continue
            code = proc.poll()
            if code is None:
                if slot.term_at is not None and now - slot.term_at > STOP_GRACE:
                    self.notes.append(f"{slot.name} still running {STOP_GRACE:.0f}s after SIGTERM; killed")
                    self.signal(slot.name, signal.SIGKILL)
                    slot.term_at = None
                continue
            if slot.exited_at is None:
                slot.exited_at = now
                slot.exits.append(code)
            if restart and now - slot.exited_at >= RESTART_AFTER:
                self.start(slot)

    def cut(self, names: list[str], service: str, seconds: float, mode: str) -> None:
        now = time.monotonic()
        for name in names:
            slot = self.slots[name]
            (slot.pg if service == "pg" else slot.redis).cut_for(now, seconds, mode)

    def heal_all(self) -> None:
        for slot in self.slots.values():
            for path in (slot.pg, slot.redis):
                if path.cut is not None:
                    path.cut.until = 0.0
                    path.heal_if_due(time.monotonic())

    def stop(self) -> None:
        for name in self.slots:
            self.signal(name, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for slot in self.slots.values():
            if slot.proc is None:
                continue
            try:
                slot.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.signal(slot.name, signal.SIGKILL)
                slot.proc.wait(timeout=10)
        for slot in self.slots.values():
            slot.pg.proxy.close()
            slot.redis.proxy.close()
        for log in self._logs:
            log.close()


def _port(url: str, default: int) -> int:
    hostport = url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    return int(hostport.rsplit(":", 1)[1]) if ":" in hostport else default


def _with_port(url: str, port: int) -> str:
    scheme, rest = url.split("://", 1)
    hostport, _, path = rest.partition("/")
    auth, _, host = hostport.rpartition("@")
    host = host.rsplit(":", 1)[0]
    return f"{scheme}://{auth + '@' if auth else ''}{host}:{port}/{path}"


# --- the job's state history -------------------------------------------------------------------------


@dataclass
class Op:
    """An operator's command: what, when it started and ended (monotonic), and its exit status."""

    kind: str
    started: float
    ended: float | None = None
    rc: int | None = None
    output: str = ""


class History:
    """Job states as polled, and the operator's cancels and retries: a final state may change only by retry,
    and a cancel the store acknowledged stays until a retry (times are ``time.monotonic()``)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.seen: list[tuple[float, str]] = []
        self.ops: list[Op] = []
        self.violations: list[str] = []
        self.job = ""
        self._lock = threading.Lock()

    def run_op(self, kind: str, call: Callable[[], subprocess.CompletedProcess[str]]) -> Op:
        op = Op(kind, time.monotonic())
        with self._lock:
            self.ops.append(op)
        done = call()
        op.rc, op.output, op.ended = done.returncode, (done.stdout + done.stderr).strip(), time.monotonic()
        return op

    def observe(self, t: float, state: str) -> None:
        if state in ACTIVE:
            self._cancel_undone(t, state)
        if self.seen and self.seen[-1][1] == state:
            return
        if self.seen:
            t_before, before = self.seen[-1]
            if before in FINAL and not self._retried_between(t_before, t):
                self._violation(f"job went {before} → {state} at {t - self.t0:.1f}s with no retry")
        self.seen.append((t, state))

    def _retried_between(self, start: float, end: float) -> bool:
        """Whether a retry may have committed after ``start`` and before ``end`` (its process started before
        ``end`` and had not exited before ``start``): only then may a final state have changed."""
        with self._lock:
            return any(op.kind == "retry" and op.rc in (0, None) and op.started <= end
                       and (op.ended is None or op.ended >= start) for op in self.ops)  # fmt: skip

    def _cancel_undone(self, t: float, state: str) -> None:
        with self._lock:
            acked = [op for op in self.ops if op.kind == "cancel" and op.rc == 0 and op.ended is not None
                     and op.ended < t and f"{self.job} cancelled" in op.output]  # fmt: skip
        for op in acked:
            assert op.ended is not None
            if not self._retried_between(op.started, t):
                self._violation(f"job {state} at {t - self.t0:.1f}s, after a cancel acknowledged at "
                                f"{op.ended - self.t0:.1f}s and no retry")  # fmt: skip
                return

    def _violation(self, text: str) -> None:
        if text.split(" at ")[0] not in {v.split(" at ")[0] for v in self.violations}:  # once per kind of event
            self.violations.append(text)


# --- the verdict ---------------------------------------------------------------------------------------


@dataclass
class Verdict:
    rows: int
    state: str
    succeeded: int = 0
    failed: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    failure_codes: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.problems)


def verify(ids: list[str], state: str, out: Path, err: Path, status: dict[str, Any]) -> Verdict:
    """Every row in exactly one of the two files, each failure with its reason, counts equal to the rows."""
    v = Verdict(rows=len(ids), state=state)
    answered = [json.loads(line)["custom_id"] for line in out.read_text().splitlines() if line.strip()]
    errors = [json.loads(line) for line in err.read_text().splitlines() if line.strip()]
    failed = [str(e.get("custom_id")) for e in errors]
    v.succeeded, v.failed = len(answered), len(failed)
    both = set(answered) & set(failed)
    twice = {i for i in answered if answered.count(i) > 1} | {i for i in failed if failed.count(i) > 1}
    v.duplicated = sorted(both | twice)
    v.lost = sorted(set(ids) - set(answered) - set(failed))
    if extra := sorted((set(answered) | set(failed)) - set(ids)):
        v.problems.append(f"{len(extra)} lines for rows that do not exist: {extra[:5]}")
    for e in errors:
        error = e.get("error") or {}
        v.failure_codes[str(error.get("code"))] = v.failure_codes.get(str(error.get("code")), 0) + 1
        if not error.get("code") or not error.get("message"):
            v.problems.append(f"row {e.get('custom_id')} failed without a reason: {error}")
    counted = (status.get("total"), status.get("succeeded"), status.get("failed"))
    if counted != (len(ids), v.succeeded, v.failed) or v.succeeded + v.failed != len(ids):
        v.problems.append(f"job counts (total, succeeded, failed) = {counted}, files hold ({v.succeeded}, {v.failed})"
                          f" of {len(ids)} rows")  # fmt: skip
    if state == "completed" and (v.failed or v.lost):
        v.problems.append(f"job completed with {v.failed} failed and {len(v.lost)} missing rows")
    if state not in FINAL or state == "cancelled":
        v.problems.append(f"job ended {state}, not finished")
    return v

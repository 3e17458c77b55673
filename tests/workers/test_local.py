"""LocalFleet.stop on plain child processes: which signal each gets and which pids it reports killed."""

from __future__ import annotations

import signal
import subprocess
import sys

from tokenmill.config import Settings
from tokenmill.workers.local import LocalFleet

# The parent waits for "ready" so each child's SIGTERM handler is in place before it is signalled.
READY = "print('ready', flush=True); import time; time.sleep(60)"
POLITE = "import signal, sys; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); " + READY
STUBBORN = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " + READY


def fleet_of(settings: Settings, *scripts: str) -> LocalFleet:
    fleet = LocalFleet(settings, "unused", len(scripts), 1)
    for script in scripts:
        p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        p.stdout.close()
        fleet.procs.append(p)
    return fleet


def test_grace_lets_polite_workers_exit_and_kills_the_rest(settings: Settings) -> None:
    fleet = fleet_of(settings, POLITE, STUBBORN)
    polite, stubborn = fleet.procs
    assert fleet.stop(grace=2.0) == [stubborn.pid]
    assert polite.returncode == 0
    assert stubborn.returncode == -signal.SIGKILL
    assert fleet.alive() == 0


def test_zero_grace_kills_everyone_without_asking(settings: Settings) -> None:
    fleet = fleet_of(settings, POLITE, POLITE)
    assert sorted(fleet.stop(grace=0)) == sorted(p.pid for p in fleet.procs)
    assert [p.returncode for p in fleet.procs] == [-signal.SIGKILL, -signal.SIGKILL]


def test_already_exited_workers_are_not_reported_killed(settings: Settings) -> None:
    fleet = fleet_of(settings, "print('ready', flush=True)")
    fleet.procs[0].wait(timeout=10)
    assert fleet.stop(grace=0) == []

"""The phases of a `tokenmill run`, so a user sees where the seconds went (start-up, storing, the work)."""

from __future__ import annotations

import dataclasses
import os
import time

import psutil


def process_start() -> float:
    """When this process started, as epoch seconds, to a clock tick (10 ms).

    psutil's ``create_time`` adds the start tick to the boot time that /proc/stat gives in whole seconds, so
    on Linux it is early by the boot's fraction of a second (0.9 s on one host), and the phases line counted
    that as start-up. /proc/uptime has the boot to 10 ms.
    """
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            after_name = f.read().rsplit(")", 1)[1].split()  # the name may hold spaces and parentheses
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        start_ticks = int(after_name[19])  # field 22, starttime, in clock ticks since boot
        return time.time() - uptime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):  # not Linux
        return psutil.Process().create_time()


@dataclasses.dataclass
class Phases:
    """Where a run's seconds went, as epoch times: launch (this process started) → local workers spawned
    and dataset stored (in parallel, in the order they happened) → first chunk claimed → job finished → exit.
    Printed in the summary."""

    launch: float = dataclasses.field(default_factory=process_start)
    stored: float | None = None
    spawned: float | None = None

    def line(self, claimed: float | None, finished: float | None) -> str:
        marks = [("workers spawned", self.spawned), ("stored", self.stored), ("first chunk claimed", claimed),
                 ("finished", finished)]  # fmt: skip
        marks.sort(key=lambda m: m[1] if m[1] is not None else float("inf"))
        shown = [f"{name} {t - self.launch:.1f} s" for name, t in marks if t is not None and t >= self.launch]
        return " → ".join(["launch", *shown, f"exit {time.time() - self.launch:.1f} s"])

"""The phases of a `tokenmill run`, so a user sees where the seconds went (start-up, storing, the work)."""

from __future__ import annotations

import dataclasses
import time

import psutil


@dataclasses.dataclass
class Phases:
    """Where a run's seconds went, as epoch times: launch (this process started) → dataset stored →
    first chunk claimed → job finished → exit. Printed in the summary."""

    launch: float = dataclasses.field(default_factory=lambda: psutil.Process().create_time())
    stored: float | None = None

    def line(self, claimed: float | None, finished: float | None) -> str:
        marks = [("stored", self.stored), ("first chunk claimed", claimed), ("finished", finished)]
        shown = [f"{name} {t - self.launch:.1f} s" for name, t in marks if t is not None and t >= self.launch]
        return " → ".join(["launch", *shown, f"exit {time.time() - self.launch:.1f} s"])

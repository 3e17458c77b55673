"""Progress as plain lines, for a run whose stderr is a log file (cron, nohup, a CI job).

A progress bar redrawn in place means nothing in a log, and rich draws nothing at all until the end when
stderr is not a terminal: someone tailing the log of an overnight run could not tell working from stuck.
So `run` and `status --watch` print one line at a steady interval (``Settings.progress_seconds``, 30 s by
default) or whenever another 5 % of the rows is done, whichever comes first:

``12:04:31 job 3f2a…: 80/222 rows (36.0%), 2 failed, 1,532 prompt + 61.0 generated tok/s, ETA 12:31 (27m),
deadline 13:00``
"""

from __future__ import annotations

import time
from typing import Any, TextIO

STEP_FRACTION = 0.05


def _clock(epoch: float) -> str:
    return time.strftime("%H:%M", time.localtime(epoch))


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def progress_line(info: dict[str, Any], deadline: float | None = None, now: float | None = None) -> str:
    """One line of a job's progress (``info`` as :meth:`tokenmill.store.jobs.Progress.to_json` gives it)."""
    now = time.time() if now is None else now
    total, done, failed = int(info["total"]), int(info["done"]), int(info["failed"])
    elapsed = float(info["elapsed_s"] or 0.0)
    pct = f" ({100.0 * done / total:.1f}%)" if total else ""
    prompt_tps = int(info["prompt_tokens"]) / elapsed if elapsed > 0 else 0.0
    parts = [f"{time.strftime('%H:%M:%S', time.localtime(now))} job {info['job']}: {done}/{total} rows{pct}",
             f"{failed} failed",
             f"{prompt_tps:,.0f} prompt + {float(info['tokens_per_second']):,.1f} generated tok/s"]
    remaining = total - done
    if info["state"] not in ("queued", "running"):
        parts.append(str(info["state"]))
    elif remaining > 0 and done > 0 and elapsed > 0:
        left = remaining * elapsed / done
        parts.append(f"ETA {_clock(now + left)} ({_duration(left)})")
    else:
        parts.append("ETA ?")
    if deadline:
        parts.append(f"deadline {_clock(deadline)}")
    return ", ".join(parts)


class LogProgress:
    """Decides when the next line is due: every ``interval`` seconds, or each further 5 % of the rows."""

    def __init__(self, stream: TextIO, interval: float) -> None:
        self.stream = stream
        self.interval = interval
        self._last_at: float | None = None
        self._last_done = -1

    def update(self, info: dict[str, Any], deadline: float | None = None, *, final: bool = False) -> bool:
        """Print a line if one is due (always for ``final``); True when it printed."""
        now = time.monotonic()
        done, total = int(info["done"]), int(info["total"])
        step = max(1, int(total * STEP_FRACTION))
        due = (
            final
            or self._last_at is None
            or now - self._last_at >= self.interval
            or done - self._last_done >= step
        )
        if not due:
            return False
        self.stream.write(progress_line(info, deadline) + "\n")
        self.stream.flush()
        self._last_at, self._last_done = now, done
        return True

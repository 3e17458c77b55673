"""`tokenmill status --watch`: a live view of jobs and workers, refreshed from the store; progress lines
instead when the output is a log, not a terminal (cli/progress.py)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tokenmill.cli.common import out
from tokenmill.cli.progress import LogProgress
from tokenmill.cli.tables import Column, fitted_table
from tokenmill.config import Settings
from tokenmill.store import Store
from tokenmill.store import jobs as store_jobs
from tokenmill.store import workers as store_workers
from tokenmill.store.clock import db_now
from tokenmill.store.states import ACTIVE_STATES, JobState, WorkerState


def _eta(remaining: int, rows_per_s: float) -> str:
    if remaining <= 0:
        return "-"
    if rows_per_s <= 0:
        return "?"
    secs = int(remaining / rows_per_s)
    return f"{secs // 3600}h{secs % 3600 // 60:02d}m" if secs >= 3600 else f"{secs // 60}m{secs % 60:02d}s"


JOB_COLUMNS = (
    Column("job", key=True), Column("state", key=True), Column("model", key=True), Column("done", drop=5),
    Column("failed", drop=4), Column("total", drop=3), Column("tok/s", drop=2), Column("ETA", drop=6),
)
WORKER_COLUMNS = (
    Column("host", key=True), Column("pid", key=True), Column("state", key=True), Column("variant", key=True),
    Column("chunk", drop=6), Column("tok/s", drop=5), Column("rows", drop=3), Column("heartbeat", drop=4),
)


WIDER = "a wider terminal shows them; `tokenmill jobs --json` and `tokenmill workers --json` have every field"


class WatchState:
    """Remembers the previous poll so rates are over the refresh interval, not the whole run."""

    def __init__(self) -> None:
        self.worker_tokens: dict[str, tuple[float, int]] = {}

    def render(self, store: Store, settings: Settings, job_ref: str | None, width: int | None = None) -> Group:
        """Both tables at ``width`` (the terminal's by default), each worker's error on a line of its own."""
        lost_after = settings.lost_after
        job_rows: list[list[str | Text]] = []
        worker_rows: list[list[str | Text]] = []
        errors: list[Text] = []
        with store.session() as s:
            jobs = [store_jobs.get_job(s, job_ref)] if job_ref else store_jobs.list_jobs(s, limit=15)
            for j in jobs:
                p = store_jobs.progress(s, j)
                info = p.to_json()
                elapsed = float(info["elapsed_s"])
                rate = p.done / elapsed if elapsed > 0 else 0.0
                job_rows.append([
                    j.id, j.state, j.pinned_variant or j.family, str(p.done), str(p.failed), str(p.total),
                    f"{info['tokens_per_second']:.1f}", _eta(p.remaining, rate) if j.state == JobState.RUNNING else "-",
                ])  # fmt: skip
            now = db_now(s)  # heartbeats are the store's time, whatever this host's clock says
            for w in store_workers.list_workers(s):
                state = store_workers.effective_state(w, lost_after, now)
                if state == WorkerState.STOPPED:
                    continue
                prev_t, prev_tokens = self.worker_tokens.get(w.id, (now, w.tokens_generated))
                tps = (w.tokens_generated - prev_tokens) / (now - prev_t) if now > prev_t else 0.0
                self.worker_tokens[w.id] = (now, w.tokens_generated)
                worker_rows.append([
                    w.host, str(w.pid), state, w.variant or "-", str(w.current_chunk or "-"), f"{tps:.1f}",
                    str(w.rows_done), f"{now - w.heartbeat_at:.0f}s ago",
                ])  # fmt: skip
                if w.error:
                    errors.append(Text(f"{w.host} {w.pid} {state}: {w.error}"))
        width = width or out.width
        parts: list[Table | Text] = []
        for title, columns, rows in (("jobs", JOB_COLUMNS, job_rows), ("workers", WORKER_COLUMNS, worker_rows)):
            table, note = fitted_table(title, columns, rows, width, more=WIDER, run_on=False)
            parts += [table, *([Text(note)] if note else [])]
        return Group(*parts, *errors)


def watch_view(store: Store, settings: Settings, job_ref: str | None, interval: float) -> None:
    if not out.is_terminal:
        watch_lines(store, settings, job_ref, interval, sys.stdout)
        return
    state = WatchState()
    with Live(state.render(store, settings, job_ref), console=out, refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(state.render(store, settings, job_ref))
        except KeyboardInterrupt:
            return


def watch_lines(store: Store, settings: Settings, job_ref: str | None, interval: float, stream: TextIO) -> None:
    """Progress lines of the job (or of every unfinished job) until it ends (or Ctrl-C): each job's line at
    ``Settings.progress_seconds`` or every 5 % of its rows, and a last one when it finishes."""
    trackers: dict[str, LogProgress] = {}
    ended: set[str] = set()
    try:
        while True:
            with store.session() as s:
                jobs = [store_jobs.get_job(s, job_ref)] if job_ref else store_jobs.list_jobs(s, limit=15)
                for j in jobs:
                    if j.id in ended or (j.id not in trackers and j.state not in ACTIVE_STATES and not job_ref):
                        continue
                    final = j.state not in ACTIVE_STATES
                    tracker = trackers.setdefault(j.id, LogProgress(stream, settings.progress_seconds))
                    tracker.update(store_jobs.progress(s, j).to_json(), j.options.get("deadline"), final=final)
                    if final:
                        ended.add(j.id)
            if job_ref and ended:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return

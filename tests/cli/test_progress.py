"""Progress lines for a log: `tokenmill run` with stderr to a file prints them while it runs, and
`status --watch` writing to a pipe does the same."""

from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path

import pytest

from tests.conftest import Procs, run_cli
from tests.observability.helpers import STUB_WORKER_ENV
from tokenmill.cli.progress import LogProgress, progress_line
from tokenmill.config import Settings

LINE = re.compile(r"^\d\d:\d\d:\d\d job (\w+): (\d+)/(\d+) rows .*, (\d+) failed, .* tok/s, (.*)$")


def info(done: int, total: int = 200, state: str = "running", elapsed: float = 10.0) -> dict[str, object]:
    return {"job": "j1", "state": state, "total": total, "done": done, "failed": 1, "prompt_tokens": 5000,
            "tokens_per_second": 12.5, "elapsed_s": elapsed}  # fmt: skip


def test_progress_line_has_rows_failed_rates_eta_and_deadline() -> None:
    now = time.time()
    line = progress_line(info(50), deadline=now + 3600, now=now)
    m = LINE.match(line)
    assert m is not None, line
    assert m.group(2, 3, 4) == ("50", "200", "1")
    assert "500 prompt + 12.5 generated tok/s" in line
    assert "ETA " in line and "(0m30s)" in line and "deadline " in line  # 150 rows left at 5 rows/s
    assert progress_line(info(200, state="completed"), now=now).endswith("completed")


def test_a_line_every_interval_or_every_five_percent() -> None:
    stream = io.StringIO()
    lines = LogProgress(stream, interval=3600)
    assert lines.update(info(0))  # the first read always prints
    assert not lines.update(info(9))  # under 5 % of 200 rows since the last line, well within the interval
    assert lines.update(info(10))  # 5 %
    assert not lines.update(info(11))
    assert lines.update(info(11, state="completed"), final=True)
    frequent = LogProgress(io.StringIO(), interval=0.05)
    assert frequent.update(info(0)) and not frequent.update(info(1))
    time.sleep(0.06)
    assert frequent.update(info(1))  # nothing new but the interval passed: a line says the run is alive
    assert len(stream.getvalue().splitlines()) == 3


@pytest.mark.timeout(180)
def test_run_writes_progress_lines_to_a_log_while_it_runs(tmp_path: Path, settings: Settings, procs: Procs) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"row {i}"}) + "\n" for i in range(40)))
    env = {**STUB_WORKER_ENV, "TOKENMILL_STUB_DELAY": "0.15", "TOKENMILL_PROGRESS_SECONDS": "0.5"}
    proc = procs.start(settings, "run", str(data), "--workers", "1", "--n-seq", "2", "--chunk-size", "8", env=env,
                       name="run")  # fmt: skip
    log = procs.logdir / "run-0.log"
    seen: list[tuple[int, str]] = []  # (rows done, line) read from the log while `run` was still running
    while proc.poll() is None:
        text = log.read_text(errors="replace") if log.exists() else ""
        seen = [(int(m.group(2)), m.group(0)) for m in map(LINE.match, text.splitlines()) if m]
        time.sleep(0.2)
    assert proc.returncode == 0, procs.logs()
    during = [done for done, _ in seen]
    assert len(during) >= 3 and max(during) > 0 and during == sorted(during), procs.logs()
    assert len({d for d in during if d < 40}) >= 2  # lines came while rows were still being answered
    final = [m for m in map(LINE.match, log.read_text().splitlines()) if m][-1]
    assert final.group(2, 3, 4) == ("40", "40", "0") and final.group(5) == "completed"
    assert "\x1b[" not in log.read_text()  # no progress bar escapes in a log

    watch = run_cli(settings, "status", final.group(1), "--watch", "--interval", "0.1", timeout=60)
    assert watch.returncode == 0, watch.stderr
    [line] = watch.stdout.splitlines()
    assert LINE.match(line) and line.endswith("completed") and " 40/40 rows" in line

"""The seeded fault harness (benchmarks/fault_harness.py), one short schedule each on the stub engine and on
the real model: whatever the faults, every row ends in exactly one of the output and error files.

The schedules are fixed by their seeds, so a failure here replays with the command the harness prints. The
stub one (seed 124, three workers) hits the fleet with every kind of fault the harness knows: kill -9 of the
scheduler, SIGTERM of a worker, Postgres refused for everyone, Redis silent for everyone, one worker cut off
from Postgres, a worker restarted with its clock 4 minutes ahead beside one started 3 minutes behind, cancel
and retry of the job, and a poison row that kills each worker that tries it (it fails alone, `worker_died`).
The real one (seed 20, SmolLM2) kills a worker, cuts one off from Redis, stops the scheduler, silences
Postgres and cancels and retries.
The long mode (minutes of schedules) is a benchmark: see README, "Reliability".
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, need, port_open
from tests.reliability.test_clock_skew import LIBFAKETIME

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

SHORT = ["--span", "20", "--max-outage", "8", "--lease", "6", "--max-chunk-attempts", "3", "--recover", "150"]


def run_harness(tmp_path: Path, redis_url: str, *args: str) -> dict[str, Any]:
    need(port_open("127.0.0.1", 5432), "PostgreSQL on 127.0.0.1:5432")
    need(shutil.which("faketime") is not None and LIBFAKETIME.exists(), "libfaketime (apt-get install faketime)")
    report = tmp_path / "report.json"
    db = redis_url.rsplit("/", 1)[1]
    argv = [sys.executable, str(REPO / "benchmarks" / "fault_harness.py"), *SHORT, *args,
            "--redis-db", db, "--report", str(report)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=420, cwd=REPO)
    print(done.stdout[-3000:], done.stderr[-3000:])
    (schedule,) = json.loads(report.read_text())
    verdict = schedule["verdict"]
    assert verdict is not None, schedule.get("error")
    assert (verdict["lost"], verdict["duplicated"], verdict["problems"]) == ([], [], []), done.stdout
    assert done.returncode == 0 and "0 lost, 0 duplicated" in done.stdout, done.stdout + done.stderr
    assert verdict["succeeded"] + verdict["failed"] == verdict["rows"] == schedule["schedule"]["rows"]
    return dict(schedule)


@pytest.mark.timeout(480)
def test_a_stub_fleet_under_every_kind_of_fault(tmp_path: Path, redis_url: str) -> None:
    schedule = run_harness(tmp_path, redis_url, "--seed", "124", "--schedules", "1", "--real", "0", "--faults", "7-7")
    kinds = {f.split()[1] for f in schedule["faults"]}
    assert kinds == {"kill9", "sigterm", "pg_down", "redis_down", "partition", "clock", "cancel"}
    assert schedule["schedule"]["poison"] is not None and any(schedule["schedule"]["offsets"])
    # The poison row killed the workers that took it (SIGKILL: -9) until its chunk was tried a row at a time;
    # then it failed alone, and every other row of its chunk was answered.
    assert sum(code == -9 for codes in schedule["exits"].values() for code in codes) >= 3
    assert schedule["verdict"]["failure_codes"] == {"worker_died": 1}
    assert [op[:2] for op in schedule["ops"]][:2] == [["cancel", 0], ["retry", 0]]


@pytest.mark.timeout(480)
@pytest.mark.model
def test_a_real_model_fleet_under_faults(tmp_path: Path, redis_url: str, smollm2_path: Path, models_dir: Path) -> None:
    schedule = run_harness(tmp_path, redis_url, "--seed", "20", "--schedules", "0", "--real", "1", "--faults", "5-5",
                           "--models-dir", str(models_dir))  # fmt: skip
    assert schedule["schedule"]["real"] and schedule["verdict"]["state"] == "completed"
    assert {f.split()[1] for f in schedule["faults"]} >= {"kill9", "pg_down", "partition", "cancel"}

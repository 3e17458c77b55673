"""The phases line's launch mark: when the process really started, not up to a second before."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tokenmill.cli.phases import Phases

TICK = 0.011  # /proc's start time is in clock ticks (10 ms), rounded down


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc start times are Linux's")
def test_launch_is_when_the_process_started() -> None:
    code = "import time; from tokenmill.cli.phases import process_start; print(process_start(), time.time())"
    before = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    started, printed = (float(x) for x in out.split())
    assert before - TICK <= started <= printed  # psutil's create_time is before `before` by the boot's fraction


def test_the_line_counts_from_launch() -> None:
    launch = time.time() - 10.0
    line = Phases(launch=launch, stored=launch + 1.02).line(claimed=launch + 2.46, finished=None)
    assert line.startswith("launch → stored 1.0 s → first chunk claimed 2.5 s → exit 1"), line

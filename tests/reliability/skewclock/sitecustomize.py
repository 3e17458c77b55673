"""Imported at start-up by the processes tests/reliability/test_clock_skew.py runs on a skewed clock.

A host whose clock is off has a wrong wall clock (``CLOCK_REALTIME``) and a sound monotonic clock. The
test makes one with libfaketime and ``FAKETIME_DONT_FAKE_MONOTONIC=1``: without that flag libfaketime
also moves ``CLOCK_MONOTONIC`` to the faked epoch time (about 1.8e9 s), and every timed wait of Python
3.11 (``threading.Event.wait``, ``Lock.acquire(timeout=)``, ``queue.Queue.get(timeout=)``: glibc's
``sem_clockwait``, which libfaketime 0.9.10 does not intercept) asks the kernel to wake at that
monotonic time and never returns. With the flag, libfaketime's ``clock_nanosleep`` wrapper turns
Python's absolute monotonic sleep into ``EINVAL``, so ``time.sleep`` raises. That one call is replaced
here by a ``select`` with the same timeout (relative, passed through untouched); nothing else changes.
"""

import os
import select
import time

if os.environ.get("FAKETIME_DONT_FAKE_MONOTONIC") == "1" and "faketime" in os.environ.get("LD_PRELOAD", ""):

    def _sleep(seconds: float) -> None:
        if seconds < 0:
            raise ValueError("sleep length must be non-negative")
        select.select([], [], [], seconds)

    time.sleep = _sleep  # type: ignore[assignment]

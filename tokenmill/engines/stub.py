"""The ``stub`` backend: an engine with no model, for control-plane tests and benchmarks.

``tokenmill worker --engine stub`` (or ``TOKENMILL_ENGINE=stub``) still selects and resolves a real
catalog variant, so the worker registers and routes exactly like a llama.cpp one, but it never loads the
file: each row gets the deterministic text ``echo:<custom_id>`` with at most 4 completion tokens after a
fixed delay. That measures tokenmill's own overhead (scheduler, broker, leases, store) and lets crash and
redelivery tests count generations without a model's cost or randomness.

Knobs, read from the worker process's environment when the engine is built (all optional; environment
variables because tests set them per worker process, and a `--concurrency N` parent passes them on):

- ``TOKENMILL_STUB_DELAY``: seconds per row (default 0.01).
- ``TOKENMILL_STUB_LOG``: a file that gets one line per generation attempt, ``pid custom_id outcome``
  (appended with O_APPEND, so several worker processes can share it): lets a test count how often a row
  was *generated*, not only how often it was *stored*.
- ``TOKENMILL_STUB_FAIL``: rows whose prompt contains this text raise ``RuntimeError`` (a retryable
  generation failure) ...
- ``TOKENMILL_STUB_HEAL``: ... unless this file exists (so a later `tokenmill retry` can succeed).
- ``TOKENMILL_STUB_CRASH``: a row whose prompt contains this text kills the worker process (SIGKILL) when
  its turn comes, as a native crash inside a real engine would: a poison row for the fault harness
  (benchmarks/fault_harness.py). Logged as ``crashed`` first.

A prompt longer than ``n_ctx_per_seq`` *characters* fails alone with ``RequestTooLong``, as a real
engine fails a row longer than its context.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tokenmill.engine import Generation, OnDone, Refill, RowQueue, SlotUse
from tokenmill.errors import RequestTooLong, RowTimeLimit
from tokenmill.rows import DatasetRow


class StubEngine:
    """Implements :class:`tokenmill.engine.Engine`; the constructor takes the same keywords as every backend."""

    def __init__(
        self,
        model_path: Path,
        variant: str,
        *,
        n_ctx_per_seq: int = 2048,
        n_seq: int = 8,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        row_time_limit: float | None = None,
    ) -> None:
        del model_path, n_gpu_layers  # no model is loaded: the variant name alone is what results carry
        self.variant = f"{variant}+stub"  # stub answers say so, wherever the variant is shown or stored
        self.n_ctx = n_ctx_per_seq
        self.row_time_limit = row_time_limit
        self.n_seq = n_seq
        self.n_threads = n_threads or 1
        self.load_ms = 1.0
        self.slot_use = SlotUse()  # no decode steps: the stub has no slots to fill
        self.delay = float(os.environ.get("TOKENMILL_STUB_DELAY", "0.01"))
        self.log_path = os.environ.get("TOKENMILL_STUB_LOG") or None
        self.fail_mark = os.environ.get("TOKENMILL_STUB_FAIL") or None
        self.heal_path = os.environ.get("TOKENMILL_STUB_HEAL") or None
        self.crash_mark = os.environ.get("TOKENMILL_STUB_CRASH") or None

    def _log(self, row: DatasetRow, outcome: str) -> None:
        if self.log_path is None:
            return
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{os.getpid()} {row.custom_id} {outcome}\n".encode())
        finally:
            os.close(fd)

    def _should_fail(self, text: str) -> bool:
        if self.fail_mark is None or self.fail_mark not in text:
            return False
        return self.heal_path is None or not os.path.exists(self.heal_path)

    def generate(
        self,
        rows: Sequence[DatasetRow],
        on_done: OnDone,
        should_stop: Callable[[], bool],
        refill: Refill | None = None,
    ) -> None:
        queue = RowQueue(rows, refill, low_water=self.n_seq)
        while not should_stop():
            queue.top_up(idle=True)
            if queue.done:
                return
            row = queue.rows.popleft()
            text = row.prompt if row.prompt is not None else (row.messages or ({"content": ""},))[-1]["content"]
            if len(text) > self.n_ctx:
                on_done(row, RequestTooLong(f"prompt is {len(text)} tokens; the model context is {self.n_ctx}"))
                continue
            if self.row_time_limit is not None and self.delay > self.row_time_limit:
                time.sleep(self.row_time_limit)
                on_done(row, RowTimeLimit(f"the row ran past the per-row limit of {self.row_time_limit:g}s"))
                continue
            time.sleep(self.delay)
            if self.crash_mark is not None and self.crash_mark in text:
                self._log(row, "crashed")
                os.kill(os.getpid(), signal.SIGKILL)
            if self._should_fail(text):
                self._log(row, "failed")
                on_done(row, RuntimeError(f"stub engine failure for {row.custom_id}"))
                continue
            self._log(row, "generated")
            n = min(row.params.max_tokens, 4)
            on_done(
                row,
                Generation(
                    text=f"echo:{row.custom_id}",
                    finish_reason="length",
                    prompt_tokens=len(text.split()),
                    completion_tokens=n,
                    prompt_eval_ms=1.0,
                    ttft_ms=1.0,
                    eval_ms=self.delay * 1000,
                    total_ms=self.delay * 1000 + 1,
                    token_ms=[self.delay * 1000 / n] * n,
                ),
            )

    def close(self) -> None:
        pass

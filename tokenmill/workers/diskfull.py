"""The store's disk fills while work is running: workers stop and exit 6, `tokenmill run` stops with one line.

A worker meeting a full store exits (code 6, :class:`~tokenmill.errors.StoreFull`'s) instead of retrying:
every write it makes (results, lease renewals, heartbeats, claims) fails until someone frees space, so
generating on would spend the model on rows that cannot be stored, while the worker looked alive in
`tokenmill workers`. A fleet worker's supervisor (systemd, Kubernetes, `worker --concurrency N`) restarts
it with its own backoff and shows why it stopped; `tokenmill run` reads the exit status, which needs no
write to the full disk. Nothing half-done is left behind: the failed batch rolled back, its chunk was not
completed, and its lease runs out, so the same command, once space is freed, generates exactly the rows
that never reached the store.

:meth:`Store.on_full` is the one place every thread's full-disk error passes through, so neither the
writer, the heartbeat nor the feed need their own handling.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

from tokenmill.errors import StoreFull
from tokenmill.store import Store
from tokenmill.workers.local import LocalFleet

log = logging.getLogger(__name__)
EXIT_STORE_FULL = StoreFull.exit_code
STOP_REASON = "store_full"


class FullStop:
    """A worker process's side: the first full-disk error any thread meets stops the worker.

    The chunk in hand stops at the next row (``stop_chunk``), and the Celery worker gets a warm shutdown
    (SIGTERM to itself, as when a local worker's parent dies). Before Celery's signal handlers are in place
    (:meth:`arm`, on ``worker_ready``) a SIGTERM would kill the process outright, so it waits for them.
    """

    def __init__(self, store: Store, stop_chunk: Callable[[str], None]) -> None:
        self.error: StoreFull | None = None
        self._stop_chunk = stop_chunk
        self._armed = False
        self._lock = threading.Lock()
        store.on_full(self.note)

    def note(self, error: StoreFull) -> None:
        with self._lock:
            if self.error is not None:
                return
            self.error = error
            armed = self._armed
        log.warning("the store's disk is full: stopping this worker (the chunk in hand is left to its lease)")
        self._stop_chunk(STOP_REASON)
        if armed:
            _warm_shutdown()

    def arm(self) -> None:
        with self._lock:
            self._armed = True
            pending = self.error is not None
        if pending:
            _warm_shutdown()

    def exit_code(self, code: int) -> int:
        """The worker's exit code: 6 after a full store, with its one line logged (not raised: stderr is
        often a log file on that same full disk, and a failed print must not turn 6 into 1)."""
        if self.error is None:
            return code
        log.error("%s", self.error)
        return EXIT_STORE_FULL


def _warm_shutdown() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


class FullWatch:
    """`tokenmill run`'s side: a full store met by this process (its dispatcher's writes) or by a local
    worker (it exited 6) ends the run with the store's one line, instead of waiting on workers that stopped."""

    def __init__(self, store: Store, fleet: LocalFleet | None) -> None:
        self.store = store
        self.fleet = fleet
        self.error: StoreFull | None = None
        store.on_full(self._note)

    def _note(self, error: StoreFull) -> None:
        self.error = self.error or error

    def check(self) -> None:
        """Raise :class:`StoreFull` once the store's disk was found full here or by a local worker."""
        if self.error is not None:
            raise self.error
        if self.fleet is not None and EXIT_STORE_FULL in self.fleet.exit_codes():
            raise self.store.full(RuntimeError("a local worker could not write to it and stopped"))

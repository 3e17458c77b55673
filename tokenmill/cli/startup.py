"""`tokenmill run`'s start-up in parallel: the model is resolved and the local workers spawned (they import,
load the model, register) on a thread while the run stores the dataset, instead of after it.

The model is resolved once, here, before any worker starts, so the workers never race to fetch it. If
storing the dataset fails (a bad line), :meth:`FleetStarter.abandon` stops whatever was started, and the
run exits with the dataset's error, not a model's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from tokenmill.workers.local import LocalFleet
from tokenmill.workers.selection import ModelSelection


class FleetStarter:
    def __init__(self, resolve: Callable[[], ModelSelection], fleet: LocalFleet) -> None:
        self.fleet = fleet
        self._resolve = resolve
        self._lock = threading.Lock()
        self._abandoned = False
        self._started = False
        self._selection: ModelSelection | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tokenmill-fleet-start", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            selection = self._resolve()
        except BaseException as exc:  # handed to the run's thread by wait()
            self._error = exc
            return
        with self._lock:
            self._selection = selection
            if not self._abandoned:
                self.fleet.start()
                self._started = True

    def wait(self) -> ModelSelection:
        """The resolved model, once the workers are spawned; re-raises what resolving it raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._selection is not None
        return self._selection

    def abandon(self) -> bool:
        """Start no worker from now on; True when some were already started (the caller stops them)."""
        with self._lock:
            self._abandoned = True
            return self._started

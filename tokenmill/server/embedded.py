"""Embedded `serve`: the dispatcher in-process, and local workers started per model while there is work.

What `tokenmill run` does for one job, kept running for every job: a model's workers start when one of
its jobs has chunks to do and stop once that model has had nothing to do for ``idle_seconds``, so an
idle server holds no model in memory.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass

from tokenmill.celery_app import make_app
from tokenmill.config import Settings, mask_text
from tokenmill.scheduler.dispatch import Dispatcher
from tokenmill.store import Store
from tokenmill.store import batches as store_batches
from tokenmill.store import workers as store_workers
from tokenmill.workers.local import LocalFleet, default_worker_count

log = logging.getLogger(__name__)
RESTART_BACKOFF = 30.0


@dataclass
class _Running:
    fleet: LocalFleet
    idle_since: float | None = None
    started: float = 0.0


class FleetManager:
    def __init__(self, store: Store, settings: Settings, idle_seconds: float = 60.0, workers: int | None = None):
        self.store = store
        self.settings = settings
        self.idle_seconds = idle_seconds
        self.count, self.threads = default_worker_count()
        self.count = workers or self.count
        self.fleets: dict[str, _Running] = {}
        self._failed_at: dict[str, float] = {}

    def wanted_models(self) -> set[str]:
        """Models of the jobs still running (by their catalog ref, which a worker's --model takes)."""
        with self.store.session() as s:
            return store_batches.active_job_models(s)

    def tick(self) -> None:
        now = time.monotonic()
        wanted = self.wanted_models()
        for model in wanted:
            run = self.fleets.get(model)
            if run is not None and run.fleet.alive() == 0:
                log.warning("local workers for %s exited (see %s)", model, run.fleet.log_dir)
                self._stop(model)
                self._failed_at[model] = now
                run = None
            if run is None and now - self._failed_at.get(model, -RESTART_BACKOFF) >= RESTART_BACKOFF:
                fleet = LocalFleet(self.settings, model, self.count, self.threads)
                fleet.start()
                self.fleets[model] = _Running(fleet, started=now)
                log.info("started %d local workers for %s", self.count, model)
            elif run is not None:
                run.idle_since = None
        for model, run in list(self.fleets.items()):
            if model in wanted:
                continue
            run.idle_since = run.idle_since or now
            if now - run.idle_since >= self.idle_seconds:
                log.info("stopping idle local workers for %s", model)
                self._stop(model)

    def _stop(self, model: str) -> None:
        run = self.fleets.pop(model, None)
        if run is None:
            return
        killed = run.fleet.stop(grace=5.0)
        try:
            with self.store.session() as s:
                store_workers.mark_stopped(s, socket.gethostname(), killed)
        except Exception as exc:
            log.warning("could not mark stopped workers: %s", mask_text(str(exc)))

    def stop_all(self) -> None:
        for model in list(self.fleets):
            self._stop(model)


class Background:
    """The threads a `serve` process runs beside the HTTP server; started and stopped by the app's lifespan."""

    def __init__(
        self, store: Store, settings: Settings, *, embedded: bool, idle_seconds: float = 60.0,
        workers: int | None = None,
    ) -> None:  # fmt: skip
        from tokenmill.server.driver import BatchDriver
        from tokenmill.server.sweeper import Sweeper
        from tokenmill.server.webhooks import WebhookSender

        self.store = store
        self.settings = settings
        self.embedded = embedded
        self.driver = BatchDriver(store, settings)
        self.webhooks = WebhookSender(store, settings)
        self.sweeper = Sweeper(store, settings)
        self.fleets = FleetManager(store, settings, idle_seconds, workers) if embedded else None
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        self.threads.append(threading.Thread(target=self.driver.run, args=(self.stop_event,), daemon=True))
        self.threads.append(threading.Thread(target=self.webhooks.run, args=(self.stop_event,), daemon=True))
        self.threads.append(threading.Thread(target=self.sweeper.run, args=(self.stop_event,), daemon=True))
        if self.embedded:
            dispatcher = Dispatcher(self.store, make_app(self.settings), self.settings)
            self.threads.append(threading.Thread(target=dispatcher.run, args=(self.stop_event,), daemon=True))
            self.threads.append(threading.Thread(target=self._fleet_loop, daemon=True))
        for t in self.threads:
            t.start()

    def _fleet_loop(self) -> None:
        assert self.fleets is not None
        while not self.stop_event.is_set():
            try:
                self.fleets.tick()
            except Exception as exc:
                log.warning("local workers: %s", mask_text(str(exc)))
            self.stop_event.wait(1.0)

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=10)
        if self.fleets is not None:
            self.fleets.stop_all()

"""Reclaims expired files (and old webhook deliveries) in the background of every ``serve``.

An expired file is already a 404 the moment it expires (the store's readers filter on ``expires_at``);
this only frees its space, a bounded batch per pass, so a day's worth of expiries never becomes one long
transaction. A full pass is followed by another soon after, until the backlog is gone.
"""

from __future__ import annotations

import logging
import threading

from tokenmill.config import Settings, mask_text
from tokenmill.store import Store, expiry

log = logging.getLogger(__name__)
CATCH_UP_SECONDS = 1.0


class Sweeper:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def tick(self) -> int:
        """One pass; how many files it deleted."""
        deleted = expiry.sweep_files(self.store)
        if deleted:
            log.info("deleted %d expired files", deleted)
        expiry.prune_deliveries(self.store)
        return deleted

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                full = self.tick() >= expiry.SWEEP_FILES
            except Exception as exc:  # the store blinked; the next pass tries again
                log.warning("expiry sweep: %s", (mask_text(str(exc)).splitlines() or [type(exc).__name__])[0])
                full = False
            stop.wait(CATCH_UP_SECONDS if full else self.settings.sweep_seconds)

"""A worker's first chunk, taken from the store the moment its model is loaded, not when Celery delivers.

Celery needs a second or more after the model is loaded before it consumes (its own boot, the broker
connection, the transport's poll), and the dispatcher sends a chunk's message only on its next tick. On a
short `tokenmill run` that wait was most of the time to the first answer. The store, not the broker,
decides who works on what (docs/architecture.md, "The idea in four sentences"), so a freshly loaded worker
may look up the oldest waiting chunk of its own queues and take it the usual way, with
:func:`~tokenmill.store.leases.claim_for_worker` (state, lease, job and queue checked in one statement).

What happens to the chunk's message, if the dispatcher sent one: whoever receives it tries to claim it
and fails (the chunk is running under a live lease, or done), and drops it, as with any duplicate. The one
case the lease does not cover is this worker receiving that message while it is still running the chunk
itself (a claim by the lease's own owner succeeds, so a lost-and-redelivered message resumes its
chunk): :class:`FirstClaim` is the Celery task's context, and it runs one chunk at a time, so the message
waits for the direct chunk to end and then finds it done.

Only the first chunk is taken this way, and only until Celery consumes: from then on messages are as
fast, and the dispatcher's fair share across jobs and workers applies again.
"""

from __future__ import annotations

import logging
import threading

from tokenmill.config import mask_text
from tokenmill.store import DB_ERRORS, Store, leases
from tokenmill.workers.runtime import ChunkOutcome, WorkerRuntime

log = logging.getLogger(__name__)


class FirstClaim:
    """The worker runtime as the Celery task sees it, plus one chunk taken directly from the store."""

    def __init__(self, runtime: WorkerRuntime, store: Store, queues: list[str], *, poll: float = 0.05) -> None:
        self.runtime = runtime
        self.store = store
        self.queues = list(queues)
        self.poll = poll
        self.outcome: ChunkOutcome | None = None
        self._one_at_a_time = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tokenmill-first-claim", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def process_chunk(self, job_id: str, chunk_id: int) -> ChunkOutcome:
        """The Celery task's entry: waits while the direct chunk runs, so a chunk never runs twice here."""
        with self._one_at_a_time:
            return self.runtime.process_chunk(job_id, chunk_id)

    def consuming(self) -> None:
        """Celery takes messages now: stop looking in the store (a chunk already taken runs to its end)."""
        self._done.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Look no more and wait for the direct chunk (a warm shutdown has told the runtime to stop it)."""
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._done.is_set():
            try:
                if self._take_one():
                    return
            except Exception as exc:  # the message path still works (a lease left behind expires)
                detail = str(getattr(exc, "orig", exc)) if isinstance(exc, DB_ERRORS) else str(exc)
                log.warning("first claim from the store failed: %s", (mask_text(detail).splitlines() or ["?"])[0])
                return
            self._done.wait(self.poll)

    def _take_one(self) -> bool:
        """True once a chunk was claimed and run (or the runtime is stopping); False: nothing waiting yet."""
        with self._one_at_a_time:
            if self._done.is_set():
                return True
            with self.store.session() as s:
                found = leases.first_waiting(s, self.queues)
            if found is None:
                return False
            job_id, chunk_id = found
            outcome = self.runtime.process_chunk(job_id, chunk_id)
            if not outcome.claimed:
                return False  # another worker took it between the look and the claim: look again
            log.info("took chunk %s of job %s from the store before Celery consumed", chunk_id, job_id)
            self.outcome = outcome
            return True

"""The one record of a worker task's chunks: which it holds, and which of their rows are not stored yet.

A chunk's fate used to be decided across the feed, the writer, the heartbeat and the task by counters
and flags on several threads; a counter decremented when a row was *queued* for writing let a chunk
complete while a batch holding its rows had failed to commit. Here there is one owner, and a row leaves
its chunk's outstanding set only once the writer has *committed* it. The store checks the same fact
again when it completes the chunk (:func:`tokenmill.store.leases.complete`), so neither can end a chunk
with a row in neither file.

Threads (docs/architecture.md, "A worker's threads"): the engine thread adopts rows; the prefetch thread
holds chunks it claimed; the writer thread marks rows stored and closes finished chunks; the heartbeat
thread renews :meth:`Ledger.held`. Every method takes the lock, and none calls out while holding it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable


class Ledger:
    """Chunks leased to one task, each with the set of its row numbers still waiting to be stored."""

    def __init__(self, job_id: str, chunk_id: int, stop_reason: str | None = None) -> None:
        self.job_id = job_id
        self.stop_reason = stop_reason  # cancelled | lease_lost | shutdown | store_full; read by the engine loop
        self.attempts: dict[int, int] = {}  # seq -> failed tries so far, over deliveries (engine thread only)
        self._lock = threading.Lock()
        self._open: dict[int, set[int] | None] = {chunk_id: None}  # None: leased, rows not read yet
        self._closing: set[int] = set()  # in a commit that completes them: not renewed meanwhile
        self._chunk_of: dict[int, int] = {}

    def hold(self, chunk_id: int) -> None:
        """A chunk was claimed for this task (its rows are read later, by :meth:`adopt`)."""
        with self._lock:
            self._open.setdefault(chunk_id, None)

    def adopt(self, chunk_id: int, seqs: Iterable[int]) -> list[int]:
        """Take the chunk's unanswered rows; returns those not already outstanding, in the order given.

        Idempotent: a chunk claimed again while copies of its rows are still being generated or written
        (its lease lapsed and this worker took it back) adds only rows it did not already have, so no
        row is generated twice and no earlier copy is forgotten.
        """
        with self._lock:
            rows = self._open.get(chunk_id) or set()
            fresh = [seq for seq in seqs if seq not in rows]
            rows.update(fresh)
            self._open[chunk_id] = rows
            self._closing.discard(chunk_id)
            for seq in fresh:
                self._chunk_of[seq] = chunk_id
            return fresh

    def chunk_of(self, seq: int) -> int:
        with self._lock:
            return self._chunk_of[seq]

    def finishing(self, seqs: Iterable[int]) -> list[int]:
        """Chunks whose every outstanding row is among ``seqs``: a commit of ``seqs`` finishes them.

        They are marked closing (not renewed: the commit that completes them makes a renewal fail, which
        must not read as a lost lease) until :meth:`stored` or :meth:`reopen` says how the commit went.
        """
        batch = set(seqs)
        with self._lock:
            done = [c for c, rows in self._open.items() if rows is not None and rows <= batch and rows & batch]
            self._closing.update(done)
            return done

    def empty_chunks(self) -> list[int]:
        """Adopted chunks with nothing outstanding (every row answered before the claim, or cached)."""
        with self._lock:
            done = [c for c, rows in self._open.items() if rows is not None and not rows]
            self._closing.update(done)
            return done

    def stored(self, seqs: Iterable[int], closed: Iterable[int]) -> None:
        """After a commit: ``seqs`` are in the store, and the chunks in ``closed`` are no longer ours."""
        with self._lock:
            for seq in seqs:
                chunk = self._chunk_of.get(seq)
                rows = self._open.get(chunk) if chunk is not None else None
                if rows is not None:
                    rows.discard(seq)
            for chunk in closed:
                self._open.pop(chunk, None)
                self._closing.discard(chunk)

    def reopen(self, chunks: Iterable[int]) -> None:
        """A commit that would have closed ``chunks`` failed: they are held and renewed again."""
        with self._lock:
            self._closing.difference_update(chunks)

    def drop(self, chunk_id: int) -> None:
        """The chunk is no longer ours (handed back, or taken by another worker)."""
        with self._lock:
            self._open.pop(chunk_id, None)
            self._closing.discard(chunk_id)

    def held(self) -> list[int]:
        """Chunks to renew: leased to this task and not being completed right now."""
        with self._lock:
            return sorted(c for c in self._open if c not in self._closing)

    def outstanding(self) -> int:
        with self._lock:
            return sum(len(rows) for rows in self._open.values() if rows)

    def holds(self, chunk_id: int) -> bool:
        with self._lock:
            return chunk_id in self._open and chunk_id not in self._closing

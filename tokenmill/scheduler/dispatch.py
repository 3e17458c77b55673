"""The dispatch loop: keeps a bounded number of chunks in flight per model queue.

Enqueueing progressively means a million-row job never floods the broker, a cancel takes effect at
once, and jobs on the same queue share the fleet (the job with the fewest chunks in flight goes first).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections import defaultdict
from typing import Any

from celery import Celery

from tokenmill.celery_app import TASK_PROCESS_CHUNK
from tokenmill.config import Settings, mask_text, mask_url
from tokenmill.errors import StoreFull
from tokenmill.store import DB_ERRORS, Session, Store, leases
from tokenmill.store import jobs as store_jobs
from tokenmill.store import schedulers as store_schedulers
from tokenmill.store.tables import Job
from tokenmill.store.workers import live_serving

log = logging.getLogger(__name__)
IDLE_BACKOFF = 4.0


class BrokerWatch:
    """Notices a Redis broker that lost its data: restarted without persistence, flushed, failed over to
    an empty replica. Every message in it is gone then, and chunks the store marks queued would wait for
    ``requeue_after`` (minutes) before anyone sent them again.

    A marker key is set in the broker's database; when it is missing, the data is gone (or this is the
    first scheduler ever to use this broker, when nothing is queued anyway). SET NX tells exactly one
    scheduler per store (the key names the store, should two deployments share a Redis database).
    Brokers that keep their messages (kombu's SQL transport) need no watch.
    """

    def __init__(self, broker_url: str, database_url: str) -> None:
        self.broker_url = broker_url
        self.enabled = broker_url.startswith(("redis://", "rediss://"))
        self.key = "tokenmill:broker-marker:" + hashlib.sha256(database_url.encode()).hexdigest()[:16]
        self._client: Any = None

    def lost_messages(self) -> bool:
        """True once per loss of the broker's data; False when it is unreachable (the send will say so)."""
        if not self.enabled:
            return False
        import redis

        try:
            if self._client is None:
                self._client = redis.Redis.from_url(self.broker_url, socket_timeout=5, socket_connect_timeout=5)
            return bool(self._client.set(self.key, str(time.time()), nx=True))
        except (redis.RedisError, OSError) as exc:
            log.debug("broker watch: %s", mask_text(str(exc)))
            return False
        except ValueError as exc:  # a URL redis-py cannot parse (kombu may still): no watch, not no scheduler
            log.warning("cannot watch broker %s for lost messages: %s", mask_url(self.broker_url), mask_text(str(exc)))
            self.enabled = False
            return False


class Dispatcher:
    def __init__(self, store: Store, app: Celery, settings: Settings) -> None:
        self.store = store
        self.app = app
        self.settings = settings
        self.lost_after = settings.lost_after
        self.broker_watch = BrokerWatch(settings.broker_url, settings.database_url)
        self._broker_emptied = False  # set until a pass has committed the requeue (the store may be down too)
        self._next_orphan_check = 0.0
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.failing: str | None = None  # what the last pass raised, while passes fail
        self._failing_since: float | None = None
        self._next_beat = 0.0

    def tick(self) -> int:
        """One pass; returns how many chunks were sent."""
        self._broker_emptied = self.broker_watch.lost_messages() or self._broker_emptied
        broker_emptied = self._broker_emptied
        with self.store.session() as s:
            expired = leases.expire(s, self.lost_after)
            # After the broker lost its messages, every queued chunk is sent again now (duplicates of
            # messages that did survive are harmless: a chunk is claimed once); otherwise only old ones.
            stale = leases.requeue_stale(s, older_than=0.0 if broker_emptied else self.settings.requeue_after)
            if broker_emptied and stale:
                log.warning("broker %s lost its messages; queueing %d chunks again", self._masked_broker(), stale)
            elif expired or stale:
                log.info("reopened %d expired and %d stale chunks", expired, stale)
            orphaned = self._requeue_orphaned(s)
            if orphaned:
                log.info("sending %d chunks again: queued, but their messages are no longer in the broker", orphaned)
            self._finish_jobs(s)
            active = store_jobs.active_jobs(s)
            inflight = leases.inflight_by_queue(s)
            to_send: list[tuple[str, str, int]] = []
            by_queue: dict[str, list[Job]] = defaultdict(list)
            for job in active:
                by_queue[job.queue].append(job)
            for queue, queue_jobs in by_queue.items():
                limit = max(self.settings.max_inflight_per_queue, 2 * live_serving(s, queue, self.lost_after))
                slots = limit - inflight.get(queue, 0)
                to_send.extend(self._fair_share(s, queue, queue_jobs, slots))
            if to_send:
                leases.mark_queued(s, [chunk_id for _, _, chunk_id in to_send])
                for job_id in sorted({j for _, j, _ in to_send}):
                    store_jobs.start_job(s, job_id)
        self._broker_emptied = False
        for i, (queue, job_id, chunk_id) in enumerate(to_send):
            try:
                self.app.send_task(TASK_PROCESS_CHUNK, args=[job_id, chunk_id], queue=queue)
            except Exception:
                # Marked queued but never sent: hand them back now rather than after requeue_after.
                self._unqueue([c for _, _, c in to_send[i:]])
                raise
        return len(to_send)

    def _requeue_orphaned(self, s: Session) -> int:
        """Reopen chunks whose message a worker took and never claimed, because it died holding it.

        Redis keeps such a message unacked for its visibility timeout (an hour), kombu's SQL transport
        forever, and the stale requeue waits minutes. A live worker claims a chunk the moment it receives
        its message, so once the broker holds no message for a queue, a chunk there still marked queued
        after ``lost_after`` has no message left to be delivered. (If a worker did just take it, the
        second message is harmless: a chunk is claimed once.) At most one broker look per heartbeat.
        """
        now = time.monotonic()
        if now < self._next_orphan_check:
            return 0
        queues = leases.queues_with_queued_since(s, self.lost_after)
        if not queues:
            return 0
        self._next_orphan_check = now + self.settings.heartbeat_seconds
        drained = [q for q, depth in self._broker_depths(queues).items() if depth == 0]
        return leases.requeue_stale(s, self.lost_after, drained) if drained else 0

    def _broker_depths(self, queues: list[str]) -> dict[str, int]:
        """Messages waiting (not yet delivered) per queue; empty when the broker cannot tell us."""
        try:
            with self.app.pool.acquire(block=True, timeout=5) as conn:
                channel = conn.default_channel
                try:
                    return {q: int(channel.queue_declare(queue=q, durable=True, auto_delete=False)[1]) for q in queues}
                finally:
                    session = getattr(channel, "_session", None)
                    if session is not None:  # kombu's SQL channel: end the read, keep no transaction open
                        session.commit()
        except Exception as exc:
            if not _is_broker_error(exc):
                raise
            log.debug("broker depth: %s", mask_text(str(exc)))
            return {}

    def _unqueue(self, chunk_ids: list[int]) -> None:
        try:
            with self.store.session() as s:
                leases.unqueue(s, chunk_ids)
        except DB_ERRORS as exc:  # the stale requeue will get them later
            log.warning("could not reopen unsent chunks: %s", _first_line(exc))

    def _masked_broker(self) -> str:
        return self.settings.describe()["broker_url"]

    def _fair_share(self, s: Session, queue: str, jobs: list[Job], slots: int) -> list[tuple[str, str, int]]:
        """Round-robin the free slots over the queue's jobs, oldest first."""
        if slots <= 0:
            return []
        candidates = {job.id: leases.pending_chunks(s, job.id, slots) for job in jobs}
        picked: list[tuple[str, str, int]] = []
        while slots > 0 and any(candidates.values()):
            for job in jobs:
                if slots <= 0:
                    break
                if candidates[job.id]:
                    picked.append((queue, job.id, candidates[job.id].pop(0).id))
                    slots -= 1
        return picked

    def _finish_jobs(self, s: Session) -> None:
        for job_id in store_jobs.finish_jobs(s):
            log.info("job %s %s", job_id, store_jobs.state_of(s, job_id))

    def run(self, stop: threading.Event, until_job: str | None = None) -> None:
        """Loop until ``stop`` is set (or the given job reaches a final state), riding out any error.

        An outage or a bug in one pass never ends the loop: the pass is logged, the next waits longer,
        and the failure is stored (:mod:`tokenmill.store.schedulers`) so ``status``, ``workers`` and
        ``/healthz`` show a failing dispatcher instead of jobs that merely look slow. A full store disk
        ends the loop that serves one job (`tokenmill run`: the command stops with the store's one line,
        see workers/diskfull.py); the fleet scheduler waits for space instead.
        """
        base = self.settings.dispatch_interval
        delay = base
        try:
            while not stop.is_set():
                error: str | None = None
                try:
                    # A pass that sent nothing makes the next wait longer, up to IDLE_BACKOFF times the interval:
                    # an idle scheduler (or `run` while its worker chains chunks itself) costs little CPU.
                    sent = self.tick()
                    delay = base if sent else min(delay * 2, base * IDLE_BACKOFF)
                    if until_job is not None and self.job_finished(until_job):
                        return
                except StoreFull as exc:
                    if until_job is not None:
                        return
                    error = str(exc)
                    log.warning("%s; dispatching again in %.1fs", exc, delay)
                    delay = min(delay * 2, 10.0)
                except Exception as exc:
                    error = self._failed_pass(exc, delay)
                    delay = min(delay * 2, 10.0)
                self._report(error)
                stop.wait(delay)
        finally:
            self._forget()

    def _failed_pass(self, exc: Exception, delay: float) -> str:
        """Log a failed pass by its kind (store, broker, anything else) and return what to show for it."""
        if isinstance(exc, DB_ERRORS):
            reason = f"store unavailable: {_first_line(exc)}"
            self.store.engine.dispose()
        elif _is_broker_error(exc):
            reason = f"broker unavailable: {_first_line(exc)}"
        else:  # a bug, or an answer nobody expected (a Redis OOM from send_task): logged whole, then again
            reason = f"{type(exc).__name__}: {_first_line(exc)}"
            log.error("dispatch pass failed: %s", reason, exc_info=exc)
        log.warning("%s; dispatching again in %.1fs", reason, delay)
        return reason

    def _report(self, error: str | None) -> None:
        """Store this loop's liveness, at most once per heartbeat unless the failing state changed."""
        now = time.monotonic()
        changed = (error is None) != (self.failing is None)
        self.failing = error
        if self.failing is not None and self._failing_since is None:
            self._failing_since = now
        elif self.failing is None:
            self._failing_since = None
        if not changed and now < self._next_beat:
            return
        try:
            with self.store.session() as s:
                store_schedulers.beat(s, self.id, host=socket.gethostname(), pid=os.getpid(), error=error)
            self._next_beat = now + self.settings.heartbeat_seconds
        except Exception as exc:  # the store is down: that is what the next pass will say again
            log.debug("scheduler heartbeat: %s", _first_line(exc))

    def _forget(self) -> None:
        try:
            with self.store.session() as s:
                store_schedulers.remove(s, self.id)
        except Exception as exc:
            log.debug("scheduler row not removed: %s", _first_line(exc))

    @property
    def failing_for(self) -> float | None:
        """Seconds this loop's passes have been failing, or None while they work."""
        return None if self._failing_since is None else time.monotonic() - self._failing_since

    def job_finished(self, job_id: str) -> bool:
        with self.store.session() as s:
            return not store_jobs.is_unfinished(s, job_id)


def _first_line(exc: BaseException) -> str:
    """The database's own message (masked), without SQLAlchemy's statement and link lines."""
    lines = mask_text(str(getattr(exc, "orig", exc))).splitlines()
    return lines[0] if lines else type(exc).__name__


def _is_broker_error(exc: BaseException) -> bool:
    from kombu.exceptions import OperationalError as KombuOperationalError

    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
    except ImportError:  # pragma: no cover
        RedisConnectionError = OSError  # type: ignore[misc,assignment]
    return isinstance(exc, KombuOperationalError | RedisConnectionError | ConnectionError | OSError)

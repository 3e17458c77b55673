"""The dispatch loop: keeps a bounded number of chunks in flight per model queue.

Enqueueing progressively means a million-row job never floods the broker, a cancel takes effect at
once, and jobs on the same queue share the fleet (the job with the fewest chunks in flight goes first).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict

from celery import Celery
from sqlalchemy import exists, select
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from tokenmill.celery_app import TASK_PROCESS_CHUNK
from tokenmill.config import Settings, mask_text
from tokenmill.store import Store, leases
from tokenmill.store.tables import Chunk, Job, Result
from tokenmill.store.workers import live_serving

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, store: Store, app: Celery, settings: Settings) -> None:
        self.store = store
        self.app = app
        self.settings = settings
        self.lost_after = max(3 * settings.heartbeat_seconds, 10.0)

    def tick(self) -> int:
        """One pass; returns how many chunks were sent."""
        with self.store.session() as s:
            expired = leases.expire(s, self.lost_after)
            stale = leases.requeue_stale(s, older_than=max(4 * self.settings.lease_seconds, 120.0))
            if expired or stale:
                log.info("reopened %d expired and %d stale chunks", expired, stale)
            self._finish_jobs(s)
            active = list(s.scalars(select(Job).where(Job.state.in_(("queued", "running"))).order_by(Job.created_at)))
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
                for job in active:
                    if job.state == "queued" and any(j == job.id for _, j, _ in to_send):
                        job.state = "running"
                        job.started_at = job.started_at or time.time()
        for queue, job_id, chunk_id in to_send:
            self.app.send_task(TASK_PROCESS_CHUNK, args=[job_id, chunk_id], queue=queue)
        return len(to_send)

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
        open_chunk = exists().where(Chunk.job_id == Job.id, Chunk.state.notin_(("done", "cancelled")))
        for job in s.scalars(select(Job).where(Job.state.in_(("queued", "running")), ~open_chunk)):
            failed = s.scalar(select(exists().where(Result.job_id == job.id, Result.status == "failed")))
            job.state = "completed_with_errors" if failed else "completed"
            job.finished_at = time.time()
            log.info("job %s %s", job.id, job.state)

    def run(self, stop: threading.Event, until_job: str | None = None) -> None:
        """Loop until ``stop`` is set (or the given job reaches a final state), riding out outages."""
        delay = self.settings.dispatch_interval
        while not stop.is_set():
            try:
                self.tick()
                delay = self.settings.dispatch_interval
                if until_job is not None and self.job_finished(until_job):
                    return
            except (OperationalError, DBAPIError) as exc:
                log.warning("store unavailable, retrying in %.1fs: %s", delay, mask_text(str(exc.orig)).splitlines()[0])
                self.store.engine.dispose()
                delay = min(delay * 2, 10.0)
            except Exception as exc:  # broker outages surface as many kombu/redis types
                if not _is_broker_error(exc):
                    raise
                log.warning("broker unavailable, retrying in %.1fs: %s", delay, mask_text(str(exc)))
                delay = min(delay * 2, 10.0)
            stop.wait(delay)

    def job_finished(self, job_id: str) -> bool:
        with self.store.session() as s:
            job = s.get(Job, job_id)
            return job is None or job.state not in ("queued", "running", "ingesting")


def _is_broker_error(exc: BaseException) -> bool:
    from kombu.exceptions import OperationalError as KombuOperationalError

    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
    except ImportError:  # pragma: no cover
        RedisConnectionError = OSError  # type: ignore[misc,assignment]
    return isinstance(exc, KombuOperationalError | RedisConnectionError | ConnectionError | OSError)

"""The one Celery task, registered on each worker's own app with that worker's runtime bound to it.

arq hands every job a ``ctx``; here the context is the :class:`~tokenmill.workers.runtime.WorkerRuntime`
a worker builds once its model is loaded, and :func:`register` closes the task over it. No module
global holds the runtime, so nothing can run the task in a process that has no loaded engine, and a test
can register a second app with its own runtime. The message carries ids only (JSON, see
:mod:`tokenmill.celery_app` for acks_late and the rest of the wire rules); everything else comes from
the store.
"""

from __future__ import annotations

from typing import Any, Protocol

from celery import Celery, Task

from tokenmill.celery_app import TASK_PROCESS_CHUNK
from tokenmill.errors import StoreFull
from tokenmill.workers.diskfull import STOP_REASON
from tokenmill.workers.runtime import ChunkOutcome


class ChunkContext(Protocol):
    """What the task needs from its context: the worker runtime, or a test's stand-in."""

    def process_chunk(self, job_id: str, chunk_id: int) -> ChunkOutcome: ...


def process_chunk(ctx: ChunkContext, job_id: str, chunk_id: int) -> dict[str, Any]:
    """Serve one chunk with ``ctx``; the summary is for logs and Flower (results go to the store).

    A full store disk is not the task's failure (no traceback per message): the worker is already
    stopping for it (:mod:`tokenmill.workers.diskfull`), and the chunk's lease hands it on.
    """
    try:
        outcome = ctx.process_chunk(job_id, int(chunk_id))
    except StoreFull:
        return {"claimed": True, "stopped": STOP_REASON}
    return {
        "claimed": outcome.claimed,
        "generated": outcome.generated,
        "cached": outcome.cached,
        "failed": outcome.failed,
        "chunks": outcome.chunks,
        "stopped": outcome.stopped,
    }


def register(app: Celery, ctx: ChunkContext) -> Task:
    """Register ``tokenmill.process_chunk`` on ``app`` only, bound to ``ctx``.

    ``shared=False``: a shared task would be added to every Celery app this process ever finalizes;
    ``lazy=False``: registered now and returned as the task itself, not a proxy resolved later.
    """

    @app.task(name=TASK_PROCESS_CHUNK, ignore_result=True, shared=False, lazy=False)
    def process_chunk_task(job_id: str, chunk_id: int) -> dict[str, Any]:
        return process_chunk(ctx, job_id, chunk_id)

    task: Task = process_chunk_task
    return task

"""The one Celery task. Its message carries ids only; everything else comes from the store."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from tokenmill.celery_app import TASK_PROCESS_CHUNK
from tokenmill.workers import runtime


@shared_task(name=TASK_PROCESS_CHUNK, ignore_result=True)
def process_chunk(job_id: str, chunk_id: int) -> dict[str, Any]:
    outcome = runtime.current().process_chunk(job_id, int(chunk_id))
    return {
        "claimed": outcome.claimed,
        "generated": outcome.generated,
        "cached": outcome.cached,
        "failed": outcome.failed,
        "stopped": outcome.stopped,
    }

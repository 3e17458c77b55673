"""The state machine's vocabulary: every state a job, chunk, worker or result can be in.

The columns stay plain strings (no migration: a ``StrEnum`` member *is* its string), but the names live
here once, next to the tables, and only functions in ``tokenmill.store`` write them. The groups below
(active, final, in flight...) are what the rest of the code asks about; define a new one here rather
than spelling a tuple of states out at the call site.

Job:    ingesting -> queued -> running -> completed | completed_with_errors | cancelled
        (retry: completed_with_errors | cancelled -> queued)
Chunk:  pending -> queued -> running (leased) -> done; a lease that runs out, a release or a lost
        message goes back to pending; cancel: pending | queued -> cancelled
Worker: starting -> ready <-> busy -> stopped | failed; "lost" is only ever shown, never stored
Result: succeeded | failed, written once per (job, row)
File:   uploading -> processed (an abandoned upload is deleted)
Batch:  validating -> in_progress -> finalizing -> completed | expired | cancelled; validating -> failed |
        expired | cancelled; in_progress -> cancelling -> finalizing. A final batch never changes again.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    INGESTING = "ingesting"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    COMPLETED_WITH_ERRORS = "completed_with_errors"
    CANCELLED = "cancelled"


class ChunkState(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"


class WorkerState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    STOPPED = "stopped"
    FAILED = "failed"
    LOST = "lost"  # derived from a silent heartbeat; never written to the table


class ResultStatus(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class BatchStatus(StrEnum):
    """An OpenAI batch's status (``api_batches.status``); the names are OpenAI's."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


class FileStatus(StrEnum):
    """``api_files.status``: a file is ``processed`` (OpenAI's word for ready) once all its bytes are stored;
    until then it is ``uploading`` and no API route shows it."""

    UPLOADING = "uploading"
    PROCESSED = "processed"


class ErrorCode(StrEnum):
    """``results.error_code`` of a failed row."""

    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    GENERATION_FAILED = "generation_failed"
    CHUNK_ATTEMPTS_EXHAUSTED = "chunk_attempts_exhausted"
    INVALID_REQUEST = "invalid_request"  # the row asks for what the model cannot do (RowRefused)
    ROW_TIME_LIMIT_EXCEEDED = "row_time_limit_exceeded"  # ran past TOKENMILL_ROW_TIME_LIMIT (RowTimeLimit)
    WORKER_DIED = "worker_died"  # its worker process died every time the row was tried (WorkerDied)


# Jobs the dispatcher works on, and jobs that will not change again unless someone retries them.
ACTIVE_STATES: tuple[JobState, ...] = (JobState.QUEUED, JobState.RUNNING)
FINAL_STATES: tuple[JobState, ...] = (JobState.COMPLETED, JobState.COMPLETED_WITH_ERRORS, JobState.CANCELLED)
# Not final yet: still being ingested, or active.
UNFINISHED_STATES: tuple[JobState, ...] = (JobState.INGESTING, *ACTIVE_STATES)
JOB_STATES: tuple[JobState, ...] = tuple(JobState)

# Chunks that still need a worker, chunks handed to the broker or a worker, chunks nobody will touch again.
CHUNK_CLAIMABLE: tuple[ChunkState, ...] = (ChunkState.PENDING, ChunkState.QUEUED, ChunkState.RUNNING)
CHUNK_INFLIGHT: tuple[ChunkState, ...] = (ChunkState.QUEUED, ChunkState.RUNNING)
CHUNK_WAITING: tuple[ChunkState, ...] = (ChunkState.PENDING, ChunkState.QUEUED)
CHUNK_CLOSED: tuple[ChunkState, ...] = (ChunkState.DONE, ChunkState.CANCELLED)

# Workers that said they are gone, and workers that take chunks.
WORKER_GONE: tuple[WorkerState, ...] = (WorkerState.STOPPED, WorkerState.FAILED)
WORKER_SERVING: tuple[WorkerState, ...] = (WorkerState.READY, WorkerState.BUSY)

# Batches that will never change again, and batches the driver still moves along.
BATCH_FINAL: tuple[BatchStatus, ...] = (
    BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED
)  # fmt: skip
BATCH_OPEN: tuple[BatchStatus, ...] = (
    BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING, BatchStatus.CANCELLING
)  # fmt: skip
# Batches whose job runs (or ran) and whose counts are read live from its results.
BATCH_RUNNING: tuple[BatchStatus, ...] = (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING, BatchStatus.FINALIZING)

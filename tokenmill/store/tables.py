"""Tables. Times are epoch seconds (float) from the writer's clock: fleets are expected to run NTP.

State columns are plain strings holding :mod:`tokenmill.store.states` values.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tokenmill.store.states import ChunkState

BigId = BigInteger().with_variant(Integer(), "sqlite")
# The owner of what the operator submits (the CLI, an admin key, a server with no keys): one party, so
# their jobs share the result cache; a tenant's owner is a digest of its key (tokenmill.server.auth).
OPERATOR = "operator"


class Base(DeclarativeBase):
    pass


class Job(Base):
    """``owner`` decides who sees the job (the dashboard) and whose cached answers it may reuse."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_owner_created", "owner", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), default=OPERATOR, server_default=OPERATOR)
    key: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(512))
    family: Mapped[str] = mapped_column(String(128))
    pinned_variant: Mapped[str | None] = mapped_column(String(128))
    queue: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(32), index=True)
    total_rows: Mapped[int] = mapped_column(Integer, default=0)
    n_chunks: Mapped[int] = mapped_column(Integer, default=0)
    chunk_size: Mapped[int] = mapped_column(Integer)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    ab_group: Mapped[str | None] = mapped_column(String(32), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    # Engine batch fill over the job's decode steps (busy fraction = filled / slot steps), added per task.
    decode_steps: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    slot_steps: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    filled_slot_steps: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")

    @property
    def busy_fraction(self) -> float | None:
        """Slots filled / slots available over the job's decode steps; None before any step."""
        return self.filled_slot_steps / self.slot_steps if self.slot_steps else None


class RequestRow(Base):
    """A dataset row as submitted; workers rebuild requests from ``payload``, never from the file."""

    __tablename__ = "requests"
    __table_args__ = (
        UniqueConstraint("job_id", "seq", name="uq_requests_job_seq"),
        UniqueConstraint("job_id", "custom_id", name="uq_requests_job_custom_id"),
        Index("ix_requests_job_chunk", "job_id", "chunk_index"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    chunk_index: Mapped[int] = mapped_column(Integer)
    line: Mapped[int] = mapped_column(Integer)
    custom_id: Mapped[str] = mapped_column(String(512))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    prompt_chars: Mapped[int] = mapped_column(Integer, default=0)
    # Failed generation attempts so far, kept across deliveries so a redelivered chunk does not give
    # a failing row a fresh set of tries (Settings.max_row_attempts).
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Chunk(Base):
    """A unit of work. ``state``: pending → queued → running (leased) → done; leases expire back to pending."""

    __tablename__ = "chunks"
    __table_args__ = (
        UniqueConstraint("job_id", "idx", name="uq_chunks_job_idx"),
        Index("ix_chunks_state", "state", "job_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    idx: Mapped[int] = mapped_column(Integer)
    first_seq: Mapped[int] = mapped_column(Integer)
    last_seq: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=ChunkState.PENDING.value)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[float | None] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    enqueued_at: Mapped[float | None] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)


class Result(Base):
    """One per (job, row): the unique constraint is what makes "exactly once" hold under redelivery."""

    __tablename__ = "results"
    __table_args__ = (
        UniqueConstraint("job_id", "seq", name="uq_results_job_seq"),
        Index("ix_results_cache", "request_hash", "status"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    custom_id: Mapped[str] = mapped_column(String(512))
    status: Mapped[str] = mapped_column(String(16))
    body: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    variant: Mapped[str | None] = mapped_column(String(200))
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cached: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    request_hash: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)


class Worker(Base):
    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))
    family: Mapped[str | None] = mapped_column(String(128))
    variant: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str | None] = mapped_column(String(16))
    queues: Mapped[list[str]] = mapped_column(JSON, default=list)
    capacity: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    choice: Mapped[str | None] = mapped_column(Text)
    n_threads: Mapped[int] = mapped_column(Integer, default=0)
    n_seq: Mapped[int] = mapped_column(Integer, default=1)
    current_job: Mapped[str | None] = mapped_column(String(32))
    current_chunk: Mapped[int | None] = mapped_column(BigId)
    rows_done: Mapped[int] = mapped_column(BigId, default=0)
    tokens_generated: Mapped[int] = mapped_column(BigId, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float)


class Scheduler(Base):
    """A dispatch loop's liveness and its last failure, so ``status``, ``workers`` and ``/healthz`` can say
    that nobody is sending chunks (rather than a job that merely looks slow)."""

    __tablename__ = "schedulers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Float)
    beat_at: Mapped[float] = mapped_column(Float)
    failing_since: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)


class ApiFile(Base):
    """A file uploaded through (or produced for) the OpenAI-compatible API; its bytes are ``ApiFileChunk`` rows.

    ``owner`` is a digest of the API key that created it, never the key itself.
    """

    __tablename__ = "api_files"
    __table_args__ = (Index("ix_api_files_owner_created", "owner", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    bytes: Mapped[int] = mapped_column(BigId, default=0)
    lines: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float)


class ApiFileChunk(Base):
    """One slice (about 1 MiB) of a file's bytes, so any API replica can stream any file from the store."""

    __tablename__ = "api_file_chunks"

    file_id: Mapped[str] = mapped_column(ForeignKey("api_files.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class ApiBatch(Base):
    """An OpenAI batch: the API's face of one tokenmill job (``job_id``) plus the batch's own lifecycle.

    ``lease_owner``/``lease_until`` let exactly one API process validate or finalize a batch at a time;
    a crashed holder's lease runs out and another process takes over.
    """

    __tablename__ = "api_batches"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_api_batches_owner_idem"),
        Index("ix_api_batches_owner_created", "owner", "created_at"),
        Index("ix_api_batches_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(256))
    # sha256 of the creating request's body: the same Idempotency-Key with another body is refused.
    request_digest: Mapped[str | None] = mapped_column(String(64))
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(40))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    job_id: Mapped[str | None] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(String(200))
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    usage: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    in_progress_at: Mapped[float | None] = mapped_column(Float)
    finalizing_at: Mapped[float | None] = mapped_column(Float)
    completed_at: Mapped[float | None] = mapped_column(Float)
    failed_at: Mapped[float | None] = mapped_column(Float)
    expired_at: Mapped[float | None] = mapped_column(Float)
    cancelling_at: Mapped[float | None] = mapped_column(Float)
    cancelled_at: Mapped[float | None] = mapped_column(Float)

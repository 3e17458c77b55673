"""The wire objects, field for field what the official openai SDK parses (they also make the OpenAPI doc)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tokenmill.store.expiry import MAX_SECONDS, MIN_SECONDS
from tokenmill.store.tables import ApiBatch, ApiFile

ENDPOINTS = ("/v1/responses", "/v1/chat/completions", "/v1/completions", "/v1/embeddings")
Endpoint = Literal["/v1/responses", "/v1/chat/completions", "/v1/completions", "/v1/embeddings"]


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    expires_at: int | None = None
    status_details: str | None = None

    @classmethod
    def of(cls, f: ApiFile) -> FileObject:
        return cls(
            id=f.id,
            bytes=f.bytes,
            created_at=int(f.created_at),
            filename=f.filename,
            purpose=f.purpose,
            status=f.status,
            expires_at=int(f.expires_at) if f.expires_at is not None else None,
        )


class ExpiresAfter(BaseModel):
    """OpenAI's expiration policy (``expires_after`` of a file, ``output_expires_after`` of a batch)."""

    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"]
    seconds: int = Field(ge=MIN_SECONDS, le=MAX_SECONDS, strict=True)


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class BatchError(BaseModel):
    code: str | None = None
    line: int | None = None
    message: str | None = None
    param: str | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    created_at: int
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: BatchErrors | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    expires_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts | None = None
    metadata: dict[str, str] | None = None
    model: str | None = None
    usage: dict[str, Any] | None = None

    @classmethod
    def of(cls, b: ApiBatch, counts: RequestCounts | None = None) -> BatchObject:
        def t(v: float | None) -> int | None:
            return int(v) if v is not None else None

        return cls(
            id=b.id,
            endpoint=b.endpoint,
            input_file_id=b.input_file_id,
            completion_window=b.completion_window,
            status=b.status,
            created_at=int(b.created_at),
            output_file_id=b.output_file_id,
            error_file_id=b.error_file_id,
            errors=BatchErrors(data=[BatchError(**e) for e in b.errors]) if b.errors else None,
            in_progress_at=t(b.in_progress_at),
            finalizing_at=t(b.finalizing_at),
            completed_at=t(b.completed_at),
            failed_at=t(b.failed_at),
            expired_at=t(b.expired_at),
            expires_at=t(b.expires_at),
            cancelling_at=t(b.cancelling_at),
            cancelled_at=t(b.cancelled_at),
            request_counts=counts or RequestCounts(total=b.total, completed=b.completed, failed=b.failed),
            metadata=b.meta,
            model=b.model,
            usage=b.usage,
        )


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class BatchCreate(BaseModel):
    input_file_id: str = Field(min_length=1, max_length=40)
    endpoint: Endpoint
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = None
    output_expires_after: ExpiresAfter | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > 16:
            raise ValueError("at most 16 keys")
        for key, value in v.items():
            if len(key) > 64 or len(value) > 512:
                raise ValueError("keys are at most 64 characters, values at most 512")
        return v

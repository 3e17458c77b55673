"""API files: metadata rows plus their bytes in ~1 MiB chunk rows.

The bytes live in the store, not on a local disk, so every API replica in a fleet can serve every file
and a batch's input is readable wherever its validation runs; no shared volume to provision.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import BinaryIO

from sqlalchemy import ColumnElement, delete, insert, or_, select
from sqlalchemy.orm import Session

from tokenmill.store.db import Store
from tokenmill.store.tables import ApiFile, ApiFileChunk

CHUNK_BYTES = 2**20
UPLOADED = "processed"  # what OpenAI reports for a file that is ready to use


class FileTooLarge(Exception):
    """Raised while copying an upload: ``what`` says which cap ("bytes" or "lines") was passed."""

    def __init__(self, what: str, limit: int) -> None:
        self.what = what
        self.limit = limit
        super().__init__(f"file exceeds {limit} {what}")


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex[:24]


def _new_file(owner: str, filename: str, purpose: str, expires_after: float | None) -> ApiFile:
    now = time.time()
    expires_at = now + expires_after if expires_after is not None else None
    return ApiFile(
        id=new_file_id(),
        owner=owner,
        filename=filename,
        purpose=purpose,
        status=UPLOADED,
        created_at=now,
        expires_at=expires_at,
    )


def create_file(
    s: Session,
    *,
    owner: str,
    filename: str,
    purpose: str,
    source: BinaryIO,
    max_bytes: int | None = None,
    max_lines: int | None = None,
    expires_after: float | None = None,
) -> ApiFile:
    """Copy ``source`` into the store chunk by chunk; memory holds one chunk whatever the file size.

    ``expires_after``: seconds from creation until the file reads as absent (and is swept); None keeps it.
    """
    f = _new_file(owner, filename, purpose, expires_after)
    s.add(f)
    s.flush()
    size = lines = idx = 0
    last = b""
    while block := source.read(CHUNK_BYTES):
        size += len(block)
        lines += block.count(b"\n")
        last = block[-1:]
        if max_bytes is not None and size > max_bytes:
            raise FileTooLarge("bytes", max_bytes)
        if max_lines is not None and lines > max_lines:
            raise FileTooLarge("lines", max_lines)
        s.execute(insert(ApiFileChunk).values(file_id=f.id, idx=idx, data=block))
        idx += 1
    if last and last != b"\n":
        lines += 1
    if max_lines is not None and lines > max_lines:
        raise FileTooLarge("lines", max_lines)
    f.bytes = size
    f.lines = lines
    return f


class FileWriter:
    """Builds a file from text lines (batch output) inside the caller's transaction, one chunk at a time."""

    def __init__(
        self, s: Session, *, owner: str, filename: str, purpose: str, expires_after: float | None = None
    ) -> None:
        self.s = s
        self.file = _new_file(owner, filename, purpose, expires_after)
        s.add(self.file)
        s.flush()
        self._buf = bytearray()
        self._idx = 0
        self.file.bytes = 0
        self.file.lines = 0

    def write_line(self, text: str) -> None:
        data = text.encode("utf-8") + b"\n"
        self._buf += data
        self.file.bytes += len(data)
        self.file.lines += 1
        if len(self._buf) >= CHUNK_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._buf:
            self.s.execute(insert(ApiFileChunk).values(file_id=self.file.id, idx=self._idx, data=bytes(self._buf)))
            self._idx += 1
            self._buf.clear()

    def close(self) -> ApiFile:
        self._flush()
        return self.file


def live(now: float | None = None) -> ColumnElement[bool]:
    """Not expired: a file past its ``expires_at`` is absent to every reader before the sweeper deletes it."""
    return or_(ApiFile.expires_at.is_(None), ApiFile.expires_at > (time.time() if now is None else now))


def is_live(f: ApiFile, now: float | None = None) -> bool:
    return f.expires_at is None or f.expires_at > (time.time() if now is None else now)


def get_file(s: Session, file_id: str, owner: str) -> ApiFile | None:
    """The file if it exists, belongs to ``owner`` and has not expired; anything else is as good as absent."""
    f = s.get(ApiFile, file_id)
    return f if f is not None and f.owner == owner and is_live(f) else None


def list_files(
    s: Session, owner: str, *, limit: int, after: str | None = None, purpose: str | None = None
) -> tuple[list[ApiFile], bool]:
    """Newest first; returns (page, has_more)."""
    query = select(ApiFile).where(ApiFile.owner == owner, live())
    if purpose:
        query = query.where(ApiFile.purpose == purpose)
    if after:
        anchor = get_file(s, after, owner)
        if anchor is not None:
            query = query.where(
                (ApiFile.created_at < anchor.created_at)
                | ((ApiFile.created_at == anchor.created_at) & (ApiFile.id < anchor.id))
            )
    rows = list(s.scalars(query.order_by(ApiFile.created_at.desc(), ApiFile.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def delete_file(s: Session, file_id: str) -> None:
    s.execute(delete(ApiFileChunk).where(ApiFileChunk.file_id == file_id))
    s.execute(delete(ApiFile).where(ApiFile.id == file_id))


def read_chunk(s: Session, file_id: str, idx: int) -> bytes | None:
    return s.scalar(select(ApiFileChunk.data).where(ApiFileChunk.file_id == file_id, ApiFileChunk.idx == idx))


def stream(store: Store, file_id: str) -> Iterator[bytes]:
    """The file's bytes, one chunk per short transaction: no long read holds the database, memory stays flat."""
    idx = 0
    while True:
        with store.session() as s:
            data = read_chunk(s, file_id, idx)
        if data is None:
            return
        yield data
        idx += 1

"""API files: metadata rows plus their bytes in ~1 MiB chunk rows.

The bytes live in the store, not on a local disk, so every API replica in a fleet can serve every file
and a batch's input is readable wherever its validation runs; no shared volume to provision.

An upload is stored one chunk per short transaction (one long one held SQLite's only write lock for the
whole copy, and every worker's writes waited behind it); the file stays ``uploading``, shown by no route,
until a last transaction records its size and makes it ``processed``. A read checks the bytes it got
against that size, so a file deleted mid-read is an error, never a shorter file.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import BinaryIO

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session

from tokenmill.errors import FileUnreadable, StoreError
from tokenmill.store.db import Store
from tokenmill.store.states import FileStatus
from tokenmill.store.tables import ApiFile, ApiFileChunk

CHUNK_BYTES = 2**20
UPLOADED = FileStatus.PROCESSED  # what OpenAI reports for a file that is ready to use


class FileTooLarge(Exception):
    """Raised while copying an upload: ``what`` says which cap ("bytes" or "lines") was passed."""

    def __init__(self, what: str, limit: int) -> None:
        self.what = what
        self.limit = limit
        super().__init__(f"file exceeds {limit} {what}")


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex[:24]


def create_file(
    store: Store,
    *,
    owner: str,
    filename: str,
    purpose: str,
    source: BinaryIO,
    max_bytes: int | None = None,
    max_lines: int | None = None,
) -> ApiFile:
    """Copy ``source`` into the store a chunk per transaction; memory holds one chunk whatever the file size.
    On any error (a cap passed, the store gone) what was stored is deleted, or left to :func:`sweep_abandoned`."""
    file_id = new_file_id()
    with store.session() as s:
        s.add(ApiFile(id=file_id, owner=owner, filename=filename, purpose=purpose, status=FileStatus.UPLOADING,
                      bytes=0, lines=0, created_at=time.time()))  # fmt: skip
    try:
        size, lines = _copy_chunks(store, file_id, source, max_bytes, max_lines)
        with store.session() as s:
            res = s.execute(
                update(ApiFile)
                .where(ApiFile.id == file_id, ApiFile.status == FileStatus.UPLOADING)
                .values(status=FileStatus.PROCESSED, bytes=size, lines=lines)
                .execution_options(synchronize_session=False)
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                raise StoreError(f"upload {file_id} was removed before it finished")
            f = s.get(ApiFile, file_id, populate_existing=True)
            assert f is not None
            return f
    except BaseException:
        _discard(store, file_id)
        raise


def _copy_chunks(
    store: Store, file_id: str, source: BinaryIO, max_bytes: int | None, max_lines: int | None
) -> tuple[int, int]:
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
        with store.session() as s:
            s.execute(insert(ApiFileChunk).values(file_id=file_id, idx=idx, data=block))
        idx += 1
    if last and last != b"\n":
        lines += 1
    if max_lines is not None and lines > max_lines:
        raise FileTooLarge("lines", max_lines)
    return size, lines


def _discard(store: Store, file_id: str) -> None:
    try:
        with store.session() as s:
            delete_file(s, file_id)
    except Exception:  # the store is what failed: the sweep deletes the upload later
        pass


def sweep_abandoned(s: Session, before: float) -> int:
    """Delete uploads still ``uploading`` that began before ``before``: their process died mid-copy."""
    ids = list(s.scalars(select(ApiFile.id).where(ApiFile.status == FileStatus.UPLOADING, ApiFile.created_at < before)))
    for file_id in ids:
        delete_file(s, file_id)
    return len(ids)


class FileWriter:
    """Builds a file from text lines (a batch's output), one chunk per short transaction, the file
    ``uploading`` until :func:`publish` shows it in the caller's transaction (the one that finishes the batch).

    ``before_flush`` runs in each chunk's transaction first: the batch driver renews its lease there, and
    raises when the batch is no longer its to finish.
    """

    def __init__(
        self, store: Store, *, owner: str, filename: str, purpose: str,
        before_flush: Callable[[Session], object] | None = None,
    ) -> None:  # fmt: skip
        self.store = store
        self.before_flush = before_flush
        self.file = ApiFile(id=new_file_id(), owner=owner, filename=filename, purpose=purpose,
                            status=FileStatus.UPLOADING, bytes=0, lines=0, created_at=time.time())  # fmt: skip
        with store.session() as s:
            s.add(self.file)
        self._buf = bytearray()
        self._idx = 0

    def write_line(self, text: str) -> None:
        data = text.encode("utf-8") + b"\n"
        self._buf += data
        self.file.bytes += len(data)
        self.file.lines += 1
        if len(self._buf) >= CHUNK_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        with self.store.session() as s:
            if self.before_flush is not None:
                self.before_flush(s)
            s.execute(insert(ApiFileChunk).values(file_id=self.file.id, idx=self._idx, data=bytes(self._buf)))
        self._idx += 1
        self._buf.clear()

    def close(self) -> ApiFile:
        """Every line stored; the file (its size and line count in hand) is still to :func:`publish`."""
        self._flush()
        return self.file

    def discard(self) -> None:
        _discard(self.store, self.file.id)


def publish(s: Session, f: ApiFile) -> bool:
    """uploading → processed, with the size and line count the writer counted; False if it is gone."""
    res = s.execute(
        update(ApiFile)
        .where(ApiFile.id == f.id, ApiFile.status == FileStatus.UPLOADING)
        .values(status=FileStatus.PROCESSED, bytes=f.bytes, lines=f.lines)
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1  # type: ignore[attr-defined]


def get_file(s: Session, file_id: str, owner: str) -> ApiFile | None:
    """The file if it exists *and* belongs to ``owner``; another tenant's file is as good as absent."""
    f = s.get(ApiFile, file_id)
    return f if f is not None and f.owner == owner and f.status != FileStatus.UPLOADING else None


def list_files(
    s: Session, owner: str, *, limit: int, after: str | None = None, purpose: str | None = None
) -> tuple[list[ApiFile], bool]:
    """Newest first; returns (page, has_more)."""
    query = select(ApiFile).where(ApiFile.owner == owner, ApiFile.status != FileStatus.UPLOADING)
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


def check_complete(s: Session, f: ApiFile) -> None:
    """Raise :class:`FileUnreadable` unless the stored chunks are numbered 0..n-1 and hold exactly ``f.bytes``:
    checked before a download promises its ``Content-Length``."""
    count, top, size = s.execute(
        select(
            func.count(), func.max(ApiFileChunk.idx), func.coalesce(func.sum(func.length(ApiFileChunk.data)), 0)
        ).where(ApiFileChunk.file_id == f.id)
    ).one()
    if int(size) != f.bytes or (count and top != count - 1):
        raise FileUnreadable(f"file {f.id} is damaged in the store: {int(size)} of its {f.bytes} bytes are there")


def stream(store: Store, file_id: str) -> Iterator[bytes]:
    """The file's bytes, one chunk per short transaction: no long read holds the database, memory stays flat.

    Raises :class:`FileUnreadable` (after the bytes it could read) when they do not add up to the file's
    size: a file deleted mid-read must never pass for a shorter one.
    """
    with store.session() as s:
        expected = s.scalar(select(ApiFile.bytes).where(ApiFile.id == file_id))
    if expected is None:
        raise FileUnreadable(f"file {file_id} no longer exists")
    idx = got = 0
    while True:
        with store.session() as s:
            data = read_chunk(s, file_id, idx)
        if data is None:
            break
        got += len(data)
        yield data
        idx += 1
    if got != expected:
        raise FileUnreadable(
            f"file {file_id} was deleted or damaged while it was read: {got} of its {expected} bytes could be read"
        )

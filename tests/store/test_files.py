"""API files in the store: uploads in short transactions, invisible until whole; reads checked against the size."""

from __future__ import annotations

import io
import time

import pytest
from sqlalchemy import delete, func, select, update

from tokenmill.errors import FileUnreadable
from tokenmill.store import Store
from tokenmill.store import files as store_files
from tokenmill.store.tables import ApiFile, ApiFileChunk

DATA = bytes(range(256)) * 9000  # three chunks


def _upload(store: Store, data: bytes = DATA) -> ApiFile:
    return store_files.create_file(store, owner="t1", filename="b.bin", purpose="batch", source=io.BytesIO(data))


def _counts(store: Store) -> tuple[int, int]:
    with store.session() as s:
        files = s.scalar(select(func.count()).select_from(ApiFile))
        chunks = s.scalar(select(func.count()).select_from(ApiFileChunk))
    return int(files or 0), int(chunks or 0)


def test_a_file_deleted_mid_read_is_an_error_not_a_shorter_file(any_store: Store) -> None:
    f = _upload(any_store)
    reader = store_files.stream(any_store, f.id)
    first = next(reader)
    assert len(first) == store_files.CHUNK_BYTES
    with any_store.session() as s:
        store_files.delete_file(s, f.id)
    with pytest.raises(FileUnreadable, match=rf"{f.id} was deleted .*{len(first)} of its {len(DATA)} bytes"):
        list(reader)
    with pytest.raises(FileUnreadable, match="no longer exists"):
        list(store_files.stream(any_store, f.id))


def test_a_missing_chunk_is_found_before_a_download_promises_its_size(any_store: Store) -> None:
    f = _upload(any_store)
    with any_store.session() as s:
        store_files.check_complete(s, f)
        s.execute(delete(ApiFileChunk).where(ApiFileChunk.file_id == f.id, ApiFileChunk.idx == 1))
    with any_store.session() as s, pytest.raises(FileUnreadable, match="damaged"):
        store_files.check_complete(s, f)
    with pytest.raises(FileUnreadable):
        list(store_files.stream(any_store, f.id))


class _Source(io.BytesIO):
    """An upload that checks, mid-copy, what other readers see, then breaks (a client gone, a disk error)."""

    def __init__(self, store: Store, data: bytes, fail_at: int | None) -> None:
        super().__init__(data)
        self.store, self.fail_at, self.calls = store, fail_at, 0
        self.seen: list[tuple[ApiFile | None, tuple[list[ApiFile], bool]]] = []

    def read(self, size: int | None = -1) -> bytes:
        self.calls += 1
        if self.calls == 2:
            with self.store.session() as s:
                (pending,) = s.scalars(select(ApiFile.id))
                self.seen.append((store_files.get_file(s, pending, "t1"), store_files.list_files(s, "t1", limit=10)))
        if self.calls == self.fail_at:
            raise OSError("the client went away")
        return super().read(size)


def test_an_upload_is_invisible_until_whole_and_removed_when_it_fails(any_store: Store) -> None:
    broken = _Source(any_store, DATA, fail_at=3)
    with pytest.raises(OSError):
        store_files.create_file(any_store, owner="t1", filename="x", purpose="batch", source=broken)
    assert broken.seen == [(None, ([], False))]  # a chunk was stored, and no route could see the file
    assert _counts(any_store) == (0, 0)
    whole = _Source(any_store, DATA, fail_at=None)
    f = store_files.create_file(any_store, owner="t1", filename="x", purpose="batch", source=whole)
    assert whole.seen == [(None, ([], False))]
    with any_store.session() as s:
        assert store_files.get_file(s, f.id, "t1") is not None
    assert f.bytes == len(DATA) and f.lines == DATA.count(b"\n") + 1
    assert b"".join(store_files.stream(any_store, f.id)) == DATA


def test_a_cap_passed_mid_upload_leaves_nothing(store: Store) -> None:
    with pytest.raises(store_files.FileTooLarge):
        store_files.create_file(store, owner="t1", filename="x", purpose="batch", source=io.BytesIO(DATA),
                                max_bytes=len(DATA) - 1)  # fmt: skip
    assert _counts(store) == (0, 0)


def test_uploads_a_dead_process_left_are_swept_and_live_ones_kept(store: Store) -> None:
    dead, live = _upload(store), _upload(store)
    with store.session() as s:  # as a process killed mid-copy leaves them: still uploading
        s.execute(update(ApiFile).values(status="uploading"))
        s.execute(update(ApiFile).where(ApiFile.id == dead.id).values(created_at=time.time() - 7200))
    with store.session() as s:
        assert store_files.sweep_abandoned(s, time.time() - 3600) == 1
    with store.session() as s:
        assert s.get(ApiFile, dead.id) is None and s.get(ApiFile, live.id) is not None
        assert s.scalar(select(func.count()).where(ApiFileChunk.file_id == dead.id)) == 0

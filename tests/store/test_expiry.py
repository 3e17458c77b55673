"""The expiry sweep on SQLite and Postgres: only expired files go, chunks with them, a bounded number a pass."""

from __future__ import annotations

import io
import time

from sqlalchemy import func, select, update

from tokenmill.store import Store, expiry
from tokenmill.store import files as store_files
from tokenmill.store.tables import ApiFile, ApiFileChunk

OWNER = "key_" + "b" * 24


def _file(store: Store, expires_after: float | None, size: int = 3 * store_files.CHUNK_BYTES // 2) -> str:
    return store_files.create_file(
        store, owner=OWNER, filename="f.jsonl", purpose="batch", source=io.BytesIO(b"x" * size),
        expires_after=expires_after,
    ).id  # fmt: skip


def _chunks(store: Store) -> dict[str, int]:
    with store.session() as s:
        rows = s.execute(select(ApiFileChunk.file_id, func.count()).group_by(ApiFileChunk.file_id))
        return {str(f): int(n) for f, n in rows}


def test_only_expired_files_and_their_chunks_are_swept(any_store: Store) -> None:
    soon, later, never = _file(any_store, 3600), _file(any_store, 7200), _file(any_store, None)
    assert _chunks(any_store) == {soon: 2, later: 2, never: 2}
    now = time.time()
    assert expiry.sweep_files(any_store, now=now + 3599) == 0
    assert expiry.sweep_files(any_store, now=now + 3601) == 1
    assert _chunks(any_store) == {later: 2, never: 2}
    assert expiry.sweep_files(any_store, now=now + 10**9) == 1
    assert _chunks(any_store) == {never: 2}
    with any_store.session() as s:
        assert [f.id for f in s.scalars(select(ApiFile))] == [never]


def test_a_file_whose_expiry_moved_on_is_not_deleted(any_store: Store) -> None:
    """The delete re-checks expires_at in its own WHERE: a file picked for sweeping, then kept longer
    (or its row changed by another replica), stays."""
    fid = _file(any_store, 3600)
    now = time.time() + 4000
    with any_store.session() as s:
        assert expiry.expired_file_ids(s, now, 10) == [fid]
        s.execute(update(ApiFile).where(ApiFile.id == fid).values(expires_at=now + 3600))
    with any_store.session() as s:
        assert not expiry._delete_if_expired(s, fid, now)
    assert _chunks(any_store) == {fid: 2}


def test_the_readers_treat_an_expired_file_as_absent(any_store: Store) -> None:
    fid = _file(any_store, 3600)
    with any_store.session() as s:
        f = store_files.get_file(s, fid, OWNER)
        assert f is not None and f.expires_at is not None
        s.execute(update(ApiFile).where(ApiFile.id == fid).values(expires_at=time.time() - 1))
    with any_store.session() as s:
        assert store_files.get_file(s, fid, OWNER) is None
        assert store_files.list_files(s, OWNER, limit=10) == ([], False)

"""Migration 0002 against the models, and file bytes through the store, on SQLite and on Postgres."""

from __future__ import annotations

import io

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from tokenmill.store import Store
from tokenmill.store import batches as store_batches
from tokenmill.store import files as store_files
from tokenmill.store.tables import Base

API_TABLES = {"api_files", "api_file_chunks", "api_batches"}


def _check(store: Store) -> None:
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    ours = [d for d in diff if any(name in repr(d) for name in API_TABLES)]
    assert ours == []
    data = bytes(range(256)) * 9000  # binary-safe, three chunks
    f = store_files.create_file(store, owner="t1", filename="b.bin", purpose="batch", source=io.BytesIO(data))
    assert f.bytes == len(data)
    assert b"".join(store_files.stream(store, f.id)) == data
    with store.session() as s:
        one = store_batches.create_batch(
            s, owner="t1", endpoint="/v1/completions", input_file_id=f.id, completion_window="24h",
            metadata=None, idempotency_key="same",
        )  # fmt: skip
    with store.session() as s:
        again = store_batches.create_batch(
            s, owner="t1", endpoint="/v1/completions", input_file_id=f.id, completion_window="24h",
            metadata=None, idempotency_key="same",
        )  # fmt: skip
        assert again.id == one.id
        assert store_files.get_file(s, f.id, "t2") is None and store_batches.get_batch(s, one.id, "t2") is None


def test_sqlite(store: Store) -> None:
    _check(store)


@pytest.mark.postgres
def test_postgres(pg_url: str) -> None:
    store = Store(pg_url)
    store.migrate()
    try:
        _check(store)
    finally:
        store.dispose()

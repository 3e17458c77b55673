"""Migration 0010 (owners) on a store that already holds jobs, files and batches, on SQLite and on Postgres:
every existing job gets the right owner, and the schema then matches the models."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import text

from tokenmill.store import Store
from tokenmill.store.db import MIGRATIONS
from tokenmill.store.tables import OPERATOR, Base

OWNERS = MIGRATIONS / "versions" / "0010_owners.py"


def _previous() -> str:
    spec = importlib.util.spec_from_file_location("owners_migration", OWNERS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.down_revision)


def _upgrade(store: Store, target: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, target)


def _check(store: Store) -> None:
    _upgrade(store, _previous())
    now = time.time()
    with store.engine.begin() as conn:
        for job in ("api1", "api2", "cli1"):
            conn.execute(
                text(
                    "INSERT INTO jobs (id, key, name, family, queue, state, total_rows, n_chunks, chunk_size, "
                    "options, created_at) VALUES (:id, :id, :id, 'f', 'q', 'completed', 0, 0, 4, '{}', :now)"
                ),
                {"id": job, "now": now},
            )
        conn.execute(
            text(
                "INSERT INTO api_files (id, owner, filename, purpose, status, bytes, lines, created_at) "
                "VALUES ('file-1', 'local', 'a.jsonl', 'batch', 'processed', 0, 0, :now)"
            ),
            {"now": now},
        )
        for batch, owner, job in (("batch_1", "key_abc", "api1"), ("batch_2", "local", "api2")):
            conn.execute(
                text(
                    "INSERT INTO api_batches (id, owner, endpoint, input_file_id, completion_window, status, job_id, "
                    "total, completed, failed, created_at, expires_at) VALUES (:id, :owner, '/v1/chat/completions', "
                    "'file-1', '24h', 'completed', :job, 0, 0, 0, :now, :now)"
                ),
                {"id": batch, "owner": owner, "job": job, "now": now},
            )
    store.migrate()
    with store.engine.connect() as conn:
        owners = {str(i): str(o) for i, o in conn.execute(text("SELECT id, owner FROM jobs"))}
        files = set(conn.execute(text("SELECT owner FROM api_files")).scalars())
        batches = {str(i): str(o) for i, o in conn.execute(text("SELECT id, owner FROM api_batches"))}
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert owners == {"api1": "key_abc", "api2": OPERATOR, "cli1": OPERATOR}
    assert files == {OPERATOR} and batches == {"batch_1": "key_abc", "batch_2": OPERATOR}
    assert [d for d in diff if "jobs" in repr(d) or "api_batches" in repr(d)] == []


def test_sqlite(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        _check(store)
    finally:
        store.dispose()


@pytest.mark.postgres
def test_postgres(pg_url: str) -> None:
    store = Store(pg_url)
    try:
        _check(store)
    finally:
        store.dispose()


EXPIRY = MIGRATIONS / "versions" / "0017_expiry_webhooks.py"


def _check_expiry(store: Store) -> None:
    """Files stored before expiry keep no expiry; the new columns and the delivery queue match the models."""
    spec = importlib.util.spec_from_file_location("expiry_migration", EXPIRY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _upgrade(store, str(module.down_revision))
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO api_files (id, owner, filename, purpose, status, bytes, lines, created_at) "
                "VALUES ('file-old', 'operator', 'a.jsonl', 'batch', 'processed', 0, 0, 1.0)"
            )
        )
    store.migrate()
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT expires_at FROM api_files WHERE id = 'file-old'")).scalar() is None
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    tables = ("api_files", "api_batches", "webhook_deliveries")
    assert [d for d in diff if any(t in repr(d) for t in tables)] == []


def test_expiry_and_webhooks_sqlite(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        _check_expiry(store)
    finally:
        store.dispose()


@pytest.mark.postgres
def test_expiry_and_webhooks_postgres(pg_url: str) -> None:
    store = Store(pg_url)
    try:
        _check_expiry(store)
    finally:
        store.dispose()


def test_the_migrations_form_one_chain() -> None:
    """Branches that each add a migration on the same parent leave two heads, and ``upgrade head`` refuses
    to run: every store would fail to start."""
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    script = ScriptDirectory.from_config(cfg)
    assert script.get_heads() == ["0017"]
    chain = [rev.revision for rev in script.walk_revisions()]
    assert chain == ["0017", "0016", "0010", "0004", "0003", "0002", "0001"]

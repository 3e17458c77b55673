"""Engine, sessions and schema migration for the store."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, make_url, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from tokenmill.config import mask_text, mask_url, sqlalchemy_url
from tokenmill.errors import ServiceUnavailable, StoreError, StoreFull, TokenmillError

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
T = TypeVar("T")
# What a store call raises when the database is down or refuses: callers outside the store catch this
# instead of importing SQLAlchemy (DBAPIError covers OperationalError; both named for the reader).
DB_ERRORS: tuple[type[Exception], ...] = (OperationalError, DBAPIError)
# The ones worth trying again: the database is down, restarting, or locked by another writer. Others
# (a constraint, a value the column refuses) fail the same way every time.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (OperationalError,)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets workers write results while the scheduler reads; busy_timeout rides out writer overlap.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class Store:
    """A handle on the store at ``url``. Cheap to create; one per process."""

    def __init__(self, url: str, *, idle_in_transaction_timeout: float | None = None) -> None:
        """``idle_in_transaction_timeout`` (Postgres, seconds): the server rolls back a transaction of ours
        left idle that long and closes its connection. A worker cut off from the database in the middle of
        a transaction would otherwise keep its row locks (a chunk's, a result's unique key) until its TCP
        connection died, minutes later: the dispatcher and the chunk's next owner would wait on it.
        """
        self.url = url
        self.masked_url = mask_url(url)
        sa_url = sqlalchemy_url(url)
        self.is_sqlite = sa_url.startswith("sqlite")
        self.sqlite_path: str | None = None
        if self.is_sqlite:
            path = sa_url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                self.sqlite_path = path.split("?", 1)[0]
            self.engine: Engine = create_engine(sa_url, connect_args={"timeout": 60}, hide_parameters=True)
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            connect_args: dict[str, Any] = {"connect_timeout": 5}
            if idle_in_transaction_timeout:
                ms = max(1000, int(idle_in_transaction_timeout * 1000))
                options = make_url(sa_url).query.get("options")  # the URL's own libpq options are kept
                given = options if isinstance(options, str) else " ".join(options or ())
                connect_args["options"] = f"{given} -c idle_in_transaction_session_timeout={ms}".strip()
            self.engine = create_engine(
                sa_url, pool_pre_ping=True, pool_size=5, max_overflow=5, connect_args=connect_args,
                hide_parameters=True,
            )  # fmt: skip
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._full_listeners: list[Callable[[StoreFull], None]] = []

    def on_full(self, listener: Callable[[StoreFull], None]) -> None:
        """Call ``listener`` (on the failing thread) each time a transaction meets a full disk, before it
        raises: a process with many threads writing (a worker's writer, heartbeat, claims) learns of it in
        one place instead of in each thread's error path."""
        self._full_listeners.append(listener)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on any error (a full disk: :class:`StoreFull`)."""
        try:
            with self._sessions() as s, s.begin():
                yield s
        except (OperationalError, DBAPIError) as exc:
            if _is_disk_full(exc):
                raise self._noticed(self.full(exc)) from None
            raise

    def _noticed(self, error: StoreFull) -> StoreFull:
        for listener in self._full_listeners:
            listener(error)
        return error

    def full(self, exc: BaseException) -> StoreFull:
        """The one line for a full disk: where (the SQLite file, or the masked URL), and what to do."""
        where = self.sqlite_path or self.masked_url
        reason = mask_text(str(getattr(exc, "orig", exc))).strip().splitlines()[0]
        return StoreFull(
            f"the store's disk is full at {where} ({reason}); the transaction was rolled back and the store is "
            "intact: free space there and run the same command again"
        )

    def unavailable(self, exc: BaseException) -> ServiceUnavailable:
        first = mask_text(str(getattr(exc, "orig", exc)) or type(exc).__name__).strip().splitlines()
        reason = first[0] if first else type(exc).__name__
        return ServiceUnavailable(f"database {self.masked_url} is unreachable: {reason}")

    def retrying(self, fn: Callable[[], T], *, attempts: int = 8, first_delay: float = 0.5) -> T:
        """Run ``fn`` again with exponential backoff while the database is unreachable (restarts, failover)."""
        delay = first_delay
        for attempt in range(attempts):
            try:
                return fn()
            except (OperationalError, DBAPIError) as exc:
                if not _is_connection_error(exc) or attempt == attempts - 1:
                    if _is_connection_error(exc):
                        raise self.unavailable(exc) from None
                    raise
                log.warning(
                    "database %s unavailable (%s); retrying in %.1fs", self.masked_url, type(exc).__name__, delay
                )
                self.engine.dispose()
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")

    def ping(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except (OperationalError, DBAPIError) as exc:
            raise self.unavailable(exc) from None

    def migrate(self) -> None:
        """Bring the schema to head with Alembic; safe when many workers start at once.

        Alembic is imported here, not at the top: a local worker whose parent has just migrated skips this
        (workers/local.py, ``SCHEMA_READY_ENV``) and need not import it on its way to the first chunk.
        """
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        try:
            with self.engine.begin() as conn:
                if not self.is_sqlite:
                    conn.execute(text("SELECT pg_advisory_xact_lock(727274)"))
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except (OperationalError, DBAPIError) as exc:
            if _is_connection_error(exc):
                raise self.unavailable(exc) from None
            if _is_disk_full(exc):
                raise self._noticed(self.full(exc)) from None
            raise StoreError(f"cannot migrate {self.masked_url}: {mask_text(str(exc.orig)).splitlines()[0]}") from None

    def dispose(self) -> None:
        self.engine.dispose()


def unavailable_cause(exc: BaseException) -> ServiceUnavailable | None:
    """A driver error as ours when it means the store is unavailable (a refused or lost connection, a lock
    held past its timeout): worth a retry, unlike anything else a driver raises (a bug)."""
    if isinstance(exc, OperationalError) or getattr(exc, "connection_invalidated", False):
        reason = (mask_text(str(getattr(exc, "orig", None) or exc)).strip().splitlines() or [type(exc).__name__])[0]
        return ServiceUnavailable(f"{type(exc).__name__}: {reason}")
    return None


def log_reason(exc: BaseException) -> str:
    """What a log line may say about ``exc``, with no value from a row in it.

    Engines hide bound parameters (``hide_parameters``), but a driver's own message can still quote a
    value: Postgres's ``invalid input syntax for type json: "<the prompt>"`` or its ``DETAIL: Failing row
    contains (...)``. So a database error is named by its types, its SQLSTATE and the schema names involved,
    never its text, except SQLite's and the connection errors' (which name tables and hosts, not values).
    Any other exception is its type alone, and a :class:`TokenmillError` its one masked line.
    """
    if isinstance(exc, TokenmillError):
        return (mask_text(str(exc)).splitlines() or [type(exc).__name__])[0]
    if not isinstance(exc, StatementError):
        return type(exc).__name__
    orig = exc.orig
    parts = [type(exc).__name__, type(orig).__name__]
    diag = getattr(orig, "diag", None)
    if diag is not None:  # psycopg
        names = (("sqlstate", getattr(orig, "sqlstate", None)), ("table", diag.table_name),
                 ("column", diag.column_name), ("constraint", diag.constraint_name))  # fmt: skip
        parts += [f"{k}={v}" for k, v in names if v]
    if diag is None or isinstance(exc, OperationalError):
        first = mask_text(str(orig)).strip().splitlines()
        if first and (diag is not None or type(orig).__module__.startswith("sqlite3")):
            parts.append(first[0][:200])
    return " ".join(parts)


def _is_disk_full(exc: BaseException) -> bool:
    """SQLite's SQLITE_FULL, or Postgres out of space (``could not extend file``, ENOSPC)."""
    msg = str(getattr(exc, "orig", exc)).lower()
    return any(s in msg for s in ("database or disk is full", "no space left on device", "could not extend file",
                                  "could not write to file"))  # fmt: skip


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    msg = str(getattr(exc, "orig", exc)).lower()
    return any(
        s in msg
        for s in (
            "connection refused",
            "could not connect",
            "server closed the connection",
            "terminating connection",
            "connection is closed",
            "the database system is",
            "connection timed out",
            "consuming input failed",
            "unable to open database",
            "connection reset",
            "no such host",
            "name or service not known",
            "failed to resolve",
            "timeout expired",
        )
    )

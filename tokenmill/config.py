"""Typed settings, read from the environment only at the edges (CLI, worker entry)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from tokenmill.errors import ConfigError

ENV_PREFIX = "TOKENMILL_"
DEFAULT_ENGINE = "llama"  # the inference backend a worker builds unless told otherwise (tokenmill.engines)

# ``scheme://user:password@``: the password runs to the LAST "@" after it, wherever that is, because people
# write raw "@", "/" and spaces in passwords (``postgresql://u:p@ss@db/x``), which a URL parser reads as the
# host's (SQLAlchemy's make_url, libpq) or as the path (urllib). Reading too far only masks too much.
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.\-]*://[^:@/]{0,256}):(?P<pw>.*)@", re.DOTALL)
# Query and conninfo parameters that carry a credential: ``?password=``, ``sslpassword=``, ``client_secret=``,
# ``api_key=``, libpq's ``password='a b'``.
_QUERY_SECRET = re.compile(
    r"(?P<key>(?:^|[?&;\s])(?:[\w.\-]*(?:password|passwd|pwd|secret|token|apikey|api_key)|pass|key|auth)=)"
    r"(?P<value>'[^']*'|\"[^\"]*\"|[^&;#\s'\"]+)",
    re.IGNORECASE,
)
# Lines of a Postgres error that quote the row or the value at fault (a prompt, an output, file bytes).
_ROW_VALUES = re.compile(r"^(?P<key>[ \t]*(?:DETAIL|CONTEXT):).*$", re.MULTILINE)
_BAD_VALUE = re.compile(r"(?P<key>invalid input (?:syntax|value) for (?:type|enum) [\w ]{1,64}: ).+$", re.MULTILINE)


def mask_text(text: str) -> str:
    """Mask every credential a URL can carry inside free text (``user:pw@`` and ``?password=`` alike), and
    the row values a database error quotes.

    The one masking function: every URL tokenmill prints (settings views, errors, logs through
    :class:`MaskingFilter`) goes through it, because drivers quote URLs in their exception messages.
    """
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}:***@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m['key']}***", text)
    text = _ROW_VALUES.sub(lambda m: f"{m['key']} (values not logged)", text)
    return _BAD_VALUE.sub(lambda m: f"{m['key']}***", text)


def mask_url(url: str) -> str:
    """One URL with its credentials masked; also right for a password holding ``@``, ``/`` or spaces."""
    return mask_text(url)


_TRACEBACKS = logging.Formatter()


class MaskingFilter(logging.Filter):
    """Masks a log record's message, its traceback and its stack, so a URL or a row value in an exception
    (a download error, a driver's message) is masked even where the caller forgot to.

    It belongs on handlers (:func:`install_masking`): a logger's own filters never see the records its
    children propagate.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is logging's problem to report, not ours
            return True
        masked = mask_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_text(record.exc_text)
            record.exc_info = None  # nothing downstream renders the raw exception (its message, its locals) again
        if record.stack_info:
            record.stack_info = mask_text(record.stack_info)
        return True


def install_masking(*logger_names: str) -> None:
    """One :class:`MaskingFilter` on every handler of the root logger and of ``logger_names`` (uvicorn's
    loggers have handlers of their own and do not propagate)."""
    for name in ("", *logger_names):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, MaskingFilter) for f in handler.filters):
                handler.addFilter(MaskingFilter())


def split_list(text: str) -> tuple[str, ...]:
    """A comma-separated setting (keys, model names) as its non-empty items."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def sqlalchemy_url(url: str) -> str:
    """Pick the psycopg 3 driver for plain ``postgresql://`` URLs, the one tokenmill depends on."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def _float(env: Mapping[str, str], key: str, default: float) -> float:
    raw = env.get(ENV_PREFIX + key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{key}={raw!r} is not a number") from None
    if value <= 0:
        raise ConfigError(f"{ENV_PREFIX}{key}={raw!r} must be positive")
    return value


def _default_database_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'tokenmill.db'}"


def _default_broker_url(data_dir: Path) -> str:
    return f"sqla+sqlite:///{data_dir / 'broker.db'}"


# One multi-row INSERT binds about 14 parameters a row: 1,000 rows stays far below SQLite's 32,766.
MAX_RESULT_BATCH_ROWS = 1000


@dataclass(frozen=True)
class Settings:
    """Everything a scheduler, worker or CLI command needs to find the store, the broker and models.

    With nothing set, tokenmill is embedded: a SQLite store and a kombu-on-SQLite broker under
    ``data_dir`` — one machine, no services.
    """

    data_dir: Path = Path(".tokenmill")
    database_url: str = ""
    broker_url: str = ""
    models_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "tokenmill" / "models")
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 5.0
    dispatch_interval: float = 0.5
    max_inflight_per_queue: int = 8
    max_row_attempts: int = 3
    # Claims of one chunk before its unanswered rows fail (chunk_attempts_exhausted): a row that kills
    # every worker that tries it (out of memory, a crash in the engine) must not be redelivered forever.
    max_chunk_attempts: int = 5
    # Seconds one row may take from admission to its last token; past it the row fails alone with
    # row_time_limit_exceeded (a grammar that crawls must not hold a slot and a renewed lease for hours).
    row_time_limit: float = 3600.0
    # A chunk marked queued this long without being claimed is queued again: its message may be gone
    # (a worker killed between receiving and claiming it, a broker that lost messages). None: the default
    # below, long enough that a healthy queue never triggers it; a duplicate message is harmless anyway.
    requeue_seconds: float | None = None
    # `tokenmill serve`: bearer keys (TOKENMILL_API_KEYS, comma-separated; never printed) and upload caps.
    # Each API key is a tenant that sees only its own files, batches and jobs; an admin key
    # (TOKENMILL_ADMIN_KEYS) is the operator's: every tenant's jobs on the dashboard, workers, /metrics.
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    admin_keys: tuple[str, ...] = field(default=(), repr=False)
    file_max_bytes: int = 200 * 2**20
    file_max_lines: int = 50_000
    batch_window_seconds: float | None = None  # None: what completion_window says ("24h"); tests shorten it
    # `serve`: the catalog models a batch may name (TOKENMILL_SERVE_MODELS / --models, comma-separated;
    # "*" for any). Empty: an embedded server serves the models in models_dir, an API-only one any.
    serve_models: tuple[str, ...] = ()
    # The inference backend a worker builds, by name (tokenmill.engines: "llama", "stub", or a plugin's).
    # Checked when a worker starts, not here: plugin names come from installed entry points.
    engine: str = DEFAULT_ENGINE
    # Group commit of results: a worker's writer thread stores finished rows in one transaction per
    # batch of up to this many rows, or sooner once the oldest waiting row is this many ms old. Bigger
    # batches mean fewer commits; a kill -9 loses (and the next claimant regenerates) at most the rows
    # not yet committed, about two batches' worth.
    result_batch_rows: int = 64
    result_batch_ms: float = 200.0
    # Continuous batching across chunks: a worker draining a chunk claims the job's next one and feeds
    # its rows into the slots that free (tokenmill.workers.feed). Off: one chunk per task, as messages say.
    chain_chunks: bool = True
    # `run` and `status --watch` writing to a log (stderr not a terminal): a progress line at least this
    # often, and whenever another 5 % of the rows is done.
    progress_seconds: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= self.result_batch_rows <= MAX_RESULT_BATCH_ROWS:
            raise ConfigError(
                f"{ENV_PREFIX}RESULT_BATCH_ROWS={self.result_batch_rows} must be between 1 and {MAX_RESULT_BATCH_ROWS}"
            )
        data_dir = Path(self.data_dir)
        object.__setattr__(self, "data_dir", data_dir)
        if not self.database_url:
            object.__setattr__(self, "database_url", _default_database_url(data_dir))
        if not self.broker_url:
            object.__setattr__(self, "broker_url", _default_broker_url(data_dir))
        for name, url in (("database", self.database_url), ("broker", self.broker_url)):
            if "://" not in url:
                raise ConfigError(f"{name} URL {mask_url(url)!r} has no scheme (expected e.g. redis://host:6379/0)")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from ``TOKENMILL_*`` variables; explicit overrides (CLI flags) win."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        if env.get(ENV_PREFIX + "DATA_DIR"):
            values["data_dir"] = Path(env[ENV_PREFIX + "DATA_DIR"])
        if env.get(ENV_PREFIX + "DATABASE_URL"):
            values["database_url"] = env[ENV_PREFIX + "DATABASE_URL"]
        if env.get(ENV_PREFIX + "BROKER_URL"):
            values["broker_url"] = env[ENV_PREFIX + "BROKER_URL"]
        if env.get(ENV_PREFIX + "MODELS_DIR"):
            values["models_dir"] = Path(env[ENV_PREFIX + "MODELS_DIR"])
        if env.get(ENV_PREFIX + "ENGINE"):
            values["engine"] = env[ENV_PREFIX + "ENGINE"]
        values["lease_seconds"] = _float(env, "LEASE_SECONDS", cls.lease_seconds)
        values["heartbeat_seconds"] = _float(env, "HEARTBEAT_SECONDS", cls.heartbeat_seconds)
        values["dispatch_interval"] = _float(env, "DISPATCH_INTERVAL", cls.dispatch_interval)
        values["max_inflight_per_queue"] = int(_float(env, "MAX_INFLIGHT", cls.max_inflight_per_queue))
        values["max_row_attempts"] = int(_float(env, "MAX_ROW_ATTEMPTS", cls.max_row_attempts))
        values["max_chunk_attempts"] = int(_float(env, "MAX_CHUNK_ATTEMPTS", cls.max_chunk_attempts))
        values["row_time_limit"] = _float(env, "ROW_TIME_LIMIT", cls.row_time_limit)
        values["result_batch_rows"] = int(_float(env, "RESULT_BATCH_ROWS", cls.result_batch_rows))
        values["result_batch_ms"] = _float(env, "RESULT_BATCH_MS", cls.result_batch_ms)
        if env.get(ENV_PREFIX + "CHAIN_CHUNKS"):
            values["chain_chunks"] = env[ENV_PREFIX + "CHAIN_CHUNKS"].strip().lower() not in ("0", "false", "no", "off")
        values["progress_seconds"] = _float(env, "PROGRESS_SECONDS", cls.progress_seconds)
        if env.get(ENV_PREFIX + "REQUEUE_SECONDS"):
            values["requeue_seconds"] = _float(env, "REQUEUE_SECONDS", 0.0)
        for name in ("api_keys", "admin_keys"):
            if env.get(ENV_PREFIX + name.upper()):
                values[name] = tuple(k.strip() for k in env[ENV_PREFIX + name.upper()].split(",") if k.strip())
        values["file_max_bytes"] = int(_float(env, "FILE_MAX_BYTES", cls.file_max_bytes))
        values["file_max_lines"] = int(_float(env, "FILE_MAX_LINES", cls.file_max_lines))
        if env.get(ENV_PREFIX + "SERVE_MODELS"):
            values["serve_models"] = split_list(env[ENV_PREFIX + "SERVE_MODELS"])
        if env.get(ENV_PREFIX + "BATCH_WINDOW_SECONDS"):
            values["batch_window_seconds"] = _float(env, "BATCH_WINDOW_SECONDS", 1.0)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    def with_(self, **changes: object) -> Settings:
        """A copy with ``changes``; a new ``data_dir`` takes along the URLs derived from the old one.

        An embedded store left pointing into the previous data dir would silently share (or lose) state.
        """
        if "data_dir" in changes:
            old = self.data_dir
            if "database_url" not in changes and self.database_url == _default_database_url(old):
                changes["database_url"] = ""
            if "broker_url" not in changes and self.broker_url == _default_broker_url(old):
                changes["broker_url"] = ""
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def requeue_after(self) -> float:
        """Seconds before a queued, unclaimed chunk is sent again (see ``requeue_seconds``)."""
        return self.requeue_seconds or max(4 * self.lease_seconds, 120.0)

    @property
    def lost_after(self) -> float:
        """Seconds of heartbeat silence after which a worker counts as lost and its leases as free.

        Three missed beats, never under 10 s, so a GC pause or a slow commit does not count as a death.
        """
        return max(3 * self.heartbeat_seconds, 10.0)

    @property
    def keyed(self) -> bool:
        """Whether `serve` asks every caller for a key (with none configured it is open, on loopback only)."""
        return bool(self.api_keys or self.admin_keys)

    @property
    def embedded(self) -> bool:
        return self.database_url.startswith("sqlite") and self.broker_url.startswith("sqla+sqlite")

    def as_env(self) -> dict[str, str]:
        """The variables that hand these settings to a child process (a local worker)."""
        env = {
            ENV_PREFIX + "DATA_DIR": str(self.data_dir),
            ENV_PREFIX + "DATABASE_URL": self.database_url,
            ENV_PREFIX + "BROKER_URL": self.broker_url,
            ENV_PREFIX + "MODELS_DIR": str(self.models_dir),
            ENV_PREFIX + "LEASE_SECONDS": str(self.lease_seconds),
            ENV_PREFIX + "HEARTBEAT_SECONDS": str(self.heartbeat_seconds),
            ENV_PREFIX + "DISPATCH_INTERVAL": str(self.dispatch_interval),
            ENV_PREFIX + "MAX_INFLIGHT": str(self.max_inflight_per_queue),
            ENV_PREFIX + "MAX_ROW_ATTEMPTS": str(self.max_row_attempts),
            ENV_PREFIX + "MAX_CHUNK_ATTEMPTS": str(self.max_chunk_attempts),
            ENV_PREFIX + "ROW_TIME_LIMIT": str(self.row_time_limit),
            ENV_PREFIX + "ENGINE": self.engine,
            ENV_PREFIX + "RESULT_BATCH_ROWS": str(self.result_batch_rows),
            ENV_PREFIX + "RESULT_BATCH_MS": str(self.result_batch_ms),
            ENV_PREFIX + "CHAIN_CHUNKS": "1" if self.chain_chunks else "0",
        }
        if self.requeue_seconds:
            env[ENV_PREFIX + "REQUEUE_SECONDS"] = str(self.requeue_seconds)
        return env

    def describe(self) -> dict[str, str]:
        """Settings for a status view: every URL masked."""
        return {
            "data_dir": str(self.data_dir),
            "database_url": mask_url(self.database_url),
            "broker_url": mask_url(self.broker_url),
            "models_dir": str(self.models_dir),
        }

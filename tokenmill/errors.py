"""The error hierarchy.

Every failure a person can act on is a :class:`TokenmillError`. The CLI prints ``str(err)`` as one
line and exits with ``err.exit_code``; anything else escaping is a bug. Messages name *what* and
*where* (file, line, field, URL with its password masked) so nobody needs a traceback.
"""

from __future__ import annotations


class TokenmillError(Exception):
    """Root of every error tokenmill raises on purpose."""

    exit_code = 1


class UsageError(TokenmillError):
    """A command was called with options that cannot work together."""

    exit_code = 2


class ConfigError(TokenmillError):
    """A setting (env var, flag, URL) is malformed."""

    exit_code = 2


class DatasetError(TokenmillError):
    """A dataset line (or the dataset file itself) is unusable.

    ``line`` is 1-based; ``field`` is a dotted path inside the JSON object when one field is at fault.
    """

    exit_code = 3

    def __init__(self, path: str, message: str, line: int | None = None, field: str | None = None) -> None:
        self.path = path
        self.line = line
        self.field = field
        self.reason = message
        where = path if line is None else f"{path}:{line}"
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {message}")


class ModelError(TokenmillError):
    """A model cannot be found, fetched, verified or loaded."""

    exit_code = 4


class UnknownModelError(ModelError):
    """The name is neither in the catalog nor a path to a ``.gguf`` file."""


class ModelIntegrityError(ModelError):
    """A model file's sha256 does not match the catalog."""


class ModelLoadError(ModelError):
    """llama.cpp refused the file, or it cannot fit in memory."""


class ServiceUnavailable(TokenmillError):
    """The broker or database cannot be reached. Messages carry masked URLs only."""

    exit_code = 5


class StoreError(TokenmillError):
    """The store is reachable but refused an operation (schema, constraint, missing job)."""

    exit_code = 6


class StoreFull(StoreError):
    """The disk under the store is full: the transaction rolled back; free space and run it again."""


class FileUnreadable(StoreError):
    """A stored file's bytes are not all there: it was deleted while being read, or a chunk is missing."""


class JobNotFound(StoreError):
    """No job with that id (or unique id prefix) exists."""


class NoResultsYet(StoreError):
    """The job exists but no row has finished, so a report has nothing to measure yet."""


class RowRefused(TokenmillError):
    """The engine cannot serve a row as it was asked (retrying cannot help); the row fails, the job goes on."""


class RequestTooLong(RowRefused):
    """A single row cannot fit the model's context window; the row fails, the job goes on."""


class RowTimeLimit(RowRefused):
    """A row ran past the per-row time limit (a grammar that crawls, a runaway generation): it fails alone,
    and is not tried again, since another try would take as long."""


class WorkerDied(RowRefused):
    """A row was in flight each time its worker process died, as many times as a row may be tried: it
    fails alone (worker_died) instead of taking its chunk's other rows down with it."""


class JobIncomplete(TokenmillError):
    """A job ended with failed rows or was cancelled; the exit code says so to scripts."""

    exit_code = 7

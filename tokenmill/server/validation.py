"""A batch's input file → a tokenmill job, or a line-numbered list of errors and nothing stored.

The checks are the ones `tokenmill submit` makes (tokenmill/datasets.py reads every line), plus what a
batch adds: every line's ``url`` is the batch's endpoint, and every ``body.model`` names the same
catalog model (the job's model; a path to a file on the server is not something a client may name), one
this server serves (tokenmill/server/served_models.py). Whatever a line holds, an error quotes at most a
bounded piece of it: a 30 MB ``model`` must not make a 30 MB batch object.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.config import Settings
from tokenmill.dataset_fields import FieldError, bounded, show
from tokenmill.datasets import InvalidLine, json_lines, read_dataset
from tokenmill.errors import DatasetError, ModelError
from tokenmill.rows import DatasetRow
from tokenmill.scheduler.submit import auto_chunk_size, model_route
from tokenmill.server.served_models import ServedModels, model_problem, served_models
from tokenmill.store import Store
from tokenmill.store import files as store_files

MAX_ERRORS = 1000


@dataclass
class Checked:
    """What the first pass learned: the model the lines agree on, and the errors found so far."""

    model: str | None = None
    lines: int = 0
    errors: dict[int, dict[str, Any]] = field(default_factory=dict)

    def add(self, line: int, message: str, param: str | None, code: str = "invalid_request") -> None:
        """One error per line (the first found); ``line`` 0 is the file as a whole."""
        if line not in self.errors and len(self.errors) < MAX_ERRORS:
            message, param = bounded(message, 1000), None if param is None else bounded(param, 100)
            self.errors[line] = {"code": code, "line": line or None, "message": message, "param": param}

    def sorted_errors(self) -> list[dict[str, Any]]:
        return [self.errors[k] for k in sorted(self.errors)]


def spool(store: Store, file_id: str, folder: Path) -> Path:
    """The stored file on local disk, chunk by chunk, for the streaming JSONL reader."""
    path = folder / "input.jsonl"
    with open(path, "wb") as out:
        for block in store_files.stream(store, file_id):
            out.write(block)
    return path


def check_lines(path: Path, endpoint: str, settings: Settings | None = None) -> Checked:
    """Pass one: url and model per line, through the one JSONL reader (tokenmill/datasets.py), so a line
    that is not a JSON object is its line error here already. ``settings`` bring serve's model list
    (tokenmill/server/served_models.py); without them any catalog model is accepted."""
    served = served_models(settings) if settings is not None else None
    checked = Checked()
    try:
        for line, obj in json_lines(path, path.name):
            checked.lines += 1
            if isinstance(obj, FieldError):
                checked.add(line, obj.message, obj.field)
            else:
                _check_object(checked, line, obj, endpoint, served)
    except DatasetError as exc:  # the file as a whole could not be read
        checked.add(exc.line or 0, exc.reason, exc.field)
    return checked


def _check_object(checked: Checked, line: int, obj: dict[str, Any], endpoint: str, served: ServedModels | None) -> None:
    url = obj.get("url")
    if url != endpoint:
        what = f"url {show(url)} differs from" if url is not None else "missing: batch lines name"
        checked.add(line, f"{what} the batch's endpoint '{endpoint}'", "url", "invalid_url")
        return
    body = obj.get("body")
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not model:
        checked.add(line, "missing: batch lines name their model in body.model", "body.model", "missing_model")
        return
    if checked.model is None:
        problem = model_problem(model, served)
        if problem is not None:
            checked.add(line, problem, "body.model", "model_not_found")
            return
        checked.model = model
    elif model != checked.model:
        message = f"model {show(model)} differs from {show(checked.model)} (one model per batch)"
        checked.add(line, message, "body.model", "mismatched_model")


def _catalog_model(model: str) -> tuple[str, str | None]:
    problem = model_problem(model, None)
    if problem is not None:
        raise ModelError(problem)
    return model_route(model)


class Rows:
    """Pass two, the dataset reader's checks: valid rows stream on, invalid lines become batch errors."""

    def __init__(self, path: Path, checked: Checked) -> None:
        self.path = path
        self.checked = checked
        self.count = 0

    def __iter__(self) -> Iterator[DatasetRow]:
        try:
            items = read_dataset(self.path, skip_invalid=True)
            for item in items:
                if isinstance(item, InvalidLine):
                    err = item.error
                    self.checked.add(item.line, err.reason, err.field)
                else:
                    self.count += 1
                    yield item
        except DatasetError as exc:  # the file as a whole (empty, binary)
            self.checked.add(exc.line or 0, exc.reason, exc.field)


def job_key(batch_id: str) -> str:
    return hashlib.sha256(f"batch:{batch_id}".encode()).hexdigest()


def scratch() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="tokenmill-batch-")


def chunk_size(path: Path) -> int:
    return auto_chunk_size(path)

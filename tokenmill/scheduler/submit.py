"""Submitting a dataset: rows are streamed into the store in one transaction, so a job is all or nothing."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenmill.celery_app import queue_for
from tokenmill.config import DEFAULT_ENGINE
from tokenmill.dataset_fields import FieldError
from tokenmill.datasets import InvalidLine, json_lines, read_dataset
from tokenmill.errors import DatasetError
from tokenmill.output import rejected_line
from tokenmill.request_contract import Ignored, LineModel
from tokenmill.rows import GENERATION_ENDPOINTS, DatasetRow, SamplingParams
from tokenmill.store import Store
from tokenmill.store import jobs as store_jobs

if TYPE_CHECKING:
    from tokenmill.documents import PartBudget, TokenCounter
    from tokenmill.models.catalog import Family


def job_key(source: Path, model: str, options: dict[str, Any]) -> str:
    """Same input, same model and options → same key, so a re-run resumes the job.

    A file is the same input while its path, size and mtime are; a folder of documents while every
    document's (path, size, mtime, inode) is — the folder's own mtime and total size miss a document
    edited in place.
    """
    st = source.stat()
    ident = json.dumps([str(source.resolve()), *_input_stamp(source, st), model, options], sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()


def _input_stamp(source: Path, st: os.stat_result) -> list[object]:
    if not source.is_dir():
        return [st.st_size, st.st_mtime_ns]  # as before, so jobs submitted by an older tokenmill resume
    from tokenmill.documents import list_documents

    stamps = []
    for rel, path in list_documents(source):
        doc = path.stat()
        stamps.append([rel, doc.st_size, doc.st_mtime_ns, doc.st_ino])
    return ["documents", stamps]


def submit_rows(
    store: Store,
    rows: Iterable[DatasetRow],
    *,
    name: str,
    key: str,
    family: str,
    pinned_quant: str | None,
    chunk_size: int,
    options: dict[str, Any] | None = None,
    ab_group: str | None = None,
) -> str:
    with store.session() as s:
        job = store_jobs.create_job(
            s,
            key=key,
            name=name,
            family=family,
            queue=queue_for(family, pinned_quant, engine=(options or {}).get("engine", DEFAULT_ENGINE)),
            chunk_size=chunk_size,
            pinned_variant=f"{family}:{pinned_quant}" if pinned_quant else None,
            options=options,
            ab_group=ab_group,
        )
        store_jobs.ingest_rows(s, job, rows)
        return job.id


DEFAULT_CONTEXT = 2048  # a worker's default --n-ctx
TEMPLATE_ALLOWANCE = 256  # chat markup and the template's own words around {text}


def document_token_budget(max_tokens: int, n_ctx: int = DEFAULT_CONTEXT) -> int:
    """Tokens of document text per row: what is left of the context after the answer and the template.

    A part that fits this budget fits a default worker's context, so a long document becomes several
    rows that succeed instead of one row that fails with context_length_exceeded.
    """
    return max(64, n_ctx - max_tokens - TEMPLATE_ALLOWANCE)


@dataclass(frozen=True)
class Submission:
    """A dataset and how to run it: everything `run` and `submit` agree on."""

    path: Path
    model: str
    template: str | None = None
    text_field: str | None = None
    defaults: SamplingParams | None = None
    chunk_size: int | None = None  # None: chosen from the dataset's size and line lengths
    skip_invalid: bool = False
    no_cache: bool = False
    token_budget: int | None = None  # documents only; None: derived from the context and max_tokens
    n_ctx: int | None = None  # the context per request the job is run with (None: a worker's default)
    overlap: int = 0  # documents only: tokens of a part's end repeated at the start of the next
    counter: TokenCounter | None = field(default=None, compare=False)  # the model's tokenizer, for exact budgets
    models_dir: Path | None = None  # where a .gguf path's content hash is remembered (None: this process only)
    allow_unknown_fields: bool = False  # unknown request fields: counted in ``ignored``, not line errors
    model_source: str = "--model"  # where ``model`` came from, for the line error of a line naming another
    engine: str = DEFAULT_ENGINE  # part of the job's identity and queue: a stub job never resumes as a real one
    ignored: Ignored = field(default_factory=Ignored, compare=False)

    def document_budget(self) -> int:
        """Tokens of text per part when parts are budgeted without the model's tokenizer (an estimate)."""
        if self.token_budget is not None:
            return self.token_budget
        return document_token_budget((self.defaults or SamplingParams()).max_tokens, self.n_ctx or DEFAULT_CONTEXT)

    def part_budget(self) -> PartBudget | None:
        """The exact budget of one document row, when the model's tokenizer is at hand."""
        if self.counter is None:
            return None
        from tokenmill.documents import PartBudget

        max_tokens = (self.defaults or SamplingParams()).max_tokens
        return PartBudget(self.n_ctx or DEFAULT_CONTEXT, max_tokens, self.counter, self.token_budget, self.overlap)

    def options(self) -> dict[str, Any]:
        extra = {"model_sha256": model_identity(self.model, self.models_dir)} if _is_path(self.model) else {}
        return extra | {
            "model": self.model,
            "template": self.template,
            "field": self.text_field,
            "defaults": self.defaults.to_json() if self.defaults else None,
            "chunk_size": self.chunk_size,
            "no_cache": self.no_cache,
            "token_budget": self._budget_option(),
        } | ({"allow_unknown_fields": True} if self.allow_unknown_fields else {}) | self._context_options() | (
            {"engine": self.engine} if self.engine != DEFAULT_ENGINE else {}
        )

    def _budget_option(self) -> int | None:
        if not self.path.is_dir():
            return None
        return self.token_budget if self.counter is not None else self.document_budget()

    def _context_options(self) -> dict[str, Any]:
        """The context the job was sized for, and how its documents were cut (part of the job's identity)."""
        out: dict[str, Any] = {"n_ctx": self.n_ctx} if self.n_ctx else {}
        if self.path.is_dir():
            out |= {"exact_budget": self.counter is not None} | ({"overlap": self.overlap} if self.overlap else {})
        return out

    def rows(self) -> Iterator[DatasetRow | InvalidLine]:
        if self.path.is_dir():
            from tokenmill.documents import load_template, read_documents

            if not self.template:
                raise DatasetError(str(self.path), "a folder of documents needs --template")
            yield from read_documents(
                self.path,
                load_template(self.template),
                token_budget=self.document_budget(),
                defaults=self.defaults,
                budget=self.part_budget(),
            )
            return
        from tokenmill.documents import load_template

        yield from read_dataset(
            self.path,
            template=load_template(self.template) if self.template else None,
            text_field=self.text_field,
            defaults=self.defaults,
            skip_invalid=self.skip_invalid,
            ignored=self.ignored if self.allow_unknown_fields else None,
            line_model=LineModel(catalog_family, model_route(self.model, self.models_dir)[0], self.model_source),
        )


DEFAULT_MODEL = "smollm2-135m-instruct"
MODEL_SCAN_LINES = 1000


def catalog_family(name: str) -> str | None:
    """The catalog family a line's ``model`` names; None for names outside the catalog (``gpt-4o-mini``)."""
    from tokenmill.models.catalog import CATALOG, parse_model_ref
    from tokenmill.models.resolve import looks_like_path

    if looks_like_path(name):
        return None
    family, _ = parse_model_ref(name)
    return family if family in CATALOG else None


def choose_model(path: Path, model: str | None) -> tuple[str, str]:
    """(model, where it came from): ``--model``, else the first of the file's first lines naming a catalog
    model (OpenAI batch files carry ``body.model``), else the default. Later lines must agree (a line error)."""
    if model:
        return model, "--model"
    if path.is_file():
        found = _first_line_model(path)
        if found is not None:
            return found[0], f"named on line {found[1]}"
    return DEFAULT_MODEL, "the default; pass --model to choose"


def _first_line_model(path: Path) -> tuple[str, int] | None:
    """Read through the dataset reader's own line parser: a poisoned line is skipped here and reported,
    with its line number, by the reader that follows."""
    try:
        for line, obj in json_lines(path, str(path), limit=MODEL_SCAN_LINES):
            if isinstance(obj, FieldError):
                continue
            src = obj.get("body", obj)
            name = src.get("model") if isinstance(src, dict) else None
            if isinstance(name, str) and catalog_family(name) is not None:
                return name, line
    except DatasetError:
        return None  # the reader reports unreadable files
    return None


def _is_path(model: str) -> bool:
    from tokenmill.models.resolve import looks_like_path

    return looks_like_path(model)


def model_identity(model: str, models_dir: Path | None = None) -> str:
    """A .gguf path's sha256: the identity its queue, cache key and job key are made of."""
    from tokenmill.models.resolve import resolve_file

    sha = resolve_file(model, models_dir).sha256
    assert sha is not None  # resolve_file always hashes
    return sha


def model_route(model: str, models_dir: Path | None = None) -> tuple[str, str | None]:
    """(family, pinned quant) for a catalog ref or a local .gguf path; unknown models fail before any work.

    A path routes by its content, to the queue a worker serving those same bytes listens on. With
    ``models_dir``, variants quantized on this host (`models quantize`) are known too.
    """
    from tokenmill.models.catalog import get_family, parse_model_ref
    from tokenmill.models.resolve import file_family

    if _is_path(model):
        return file_family(model_identity(model, models_dir)), None
    from tokenmill.models.quantize import catalog_with_local

    catalog = catalog_with_local(models_dir) if models_dir is not None else None
    family_name, quant = parse_model_ref(model, catalog)
    family = get_family(family_name, catalog)
    return family.name, family.variant(quant).quant if quant else None


def _estimate(path: Path) -> tuple[float, float]:
    """(rows, mean line bytes) from the file size and its first 256 KiB — no full read."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(256 * 1024)
    mean_line = len(head) / max(1, head.count(b"\n"))
    return size / max(mean_line, 1.0), mean_line


def auto_chunk_size(path: Path, workers: int | None = None) -> int:
    """Rows per chunk from a cheap look at the file.

    A fleet of unknown size gets about 64+ chunks to spread; a known number of local workers gets one
    chunk per worker where that fits, because a worker's batch drains at each chunk's end. Never under
    16 rows (a batched worker keeps its sequences full), and fewer rows when prompts are long, so one
    chunk stays minutes, not hours, of work.
    """
    if path.is_dir():
        return 16
    rows, mean_line = _estimate(path)
    cap = 256 if mean_line < 1000 else (64 if mean_line < 8000 else 16)
    target = rows / workers if workers else rows / 64
    return int(max(16, min(cap, -(-target // 1))))


class _Ingest:
    """One pass over the dataset: valid rows stream to the store, invalid ones to the errors file.

    The whole ingest is one transaction, so a bad line (without --skip-invalid) rolls it back and
    nothing is stored: validation before any work, at the cost of parsing the file once, not twice.
    """

    def __init__(self, sub: Submission, errors_out: Path | None, family: Family | None = None) -> None:
        self.sub = sub
        self.errors_out = errors_out
        self.family = family  # the catalog's word on the job's model, when it is a catalog model
        self.rows = 0
        self.invalid = 0
        sub.ignored.reset()

    def __iter__(self) -> Iterator[DatasetRow]:
        fh = None
        try:
            for row_or_invalid in self.sub.rows():
                item = self._model_check(row_or_invalid)
                if isinstance(item, InvalidLine):
                    self.invalid += 1
                    if self.errors_out is not None:
                        if fh is None:
                            self.errors_out.parent.mkdir(parents=True, exist_ok=True)
                            fh = open(self.errors_out, "w", encoding="utf-8")  # noqa: SIM115
                        fh.write(json.dumps(rejected_line(item, str(self.sub.path)), ensure_ascii=False) + "\n")
                else:
                    self.rows += 1
                    yield item
        finally:
            if fh is not None:
                fh.close()
        if self.rows == 0:
            raise DatasetError(str(self.sub.path), "no valid rows to run")

    def _model_check(self, item: DatasetRow | InvalidLine) -> DatasetRow | InvalidLine:
        """A line the job's catalog model cannot serve is a line error too, before any model loads."""
        family = self.family
        if family is None or isinstance(item, InvalidLine):
            return item
        problem: tuple[str, str] | None = None
        if family.embedding and item.endpoint in GENERATION_ENDPOINTS:
            problem = (f"is a generation request, but {family.name} is an embedding model: it serves "
                       "/v1/embeddings lines only", "url")
        elif item.dimensions is not None and item.dimensions != family.n_embd:
            problem = (f"dimensions={item.dimensions} is not supported: {family.name} gives {family.n_embd}-"
                       "dimensional embeddings and cannot shorten them (leave dimensions out)", "body.dimensions")
        if problem is None:
            return item
        error = DatasetError(str(self.sub.path), problem[0], item.line, problem[1])
        if not self.sub.skip_invalid:
            raise error
        return InvalidLine(item.line, error, item.custom_id)


def _catalog_family(family: str) -> Family | None:
    from tokenmill.models.catalog import CATALOG

    return CATALOG.get(family)


def submit_dataset(
    store: Store,
    sub: Submission,
    *,
    errors_out: Path | None = None,
    ab_group: str | None = None,
    pin: str | None = None,
    chunk_size: int | None = None,
    deadline: float | None = None,
) -> tuple[str, int, int]:
    """Store a dataset as a job; returns (job id, rows stored, invalid lines skipped).

    ``chunk_size`` overrides the automatic choice and ``deadline`` (epoch seconds, shown by ``status``) is
    recorded, neither becoming part of the job's identity, so the same command resumes the same job.
    """
    family, quant = model_route(pin or sub.model, sub.models_dir)
    ingest = _Ingest(sub, errors_out if sub.skip_invalid else None, _catalog_family(family))
    job_id = submit_rows(
        store,
        ingest,
        name=str(sub.path),
        key=job_key(sub.path, pin or sub.model, sub.options()),
        family=family,
        pinned_quant=quant,
        chunk_size=sub.chunk_size or chunk_size or auto_chunk_size(sub.path),
        options={**sub.options(), **({"deadline": deadline} if deadline else {})},
        ab_group=ab_group,
    )
    return job_id, ingest.rows, ingest.invalid

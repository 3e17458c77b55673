"""Whole-document answers from the answers to its parts: map-reduce rounds (`tokenmill run --combine`).

Round 0 is the document job itself, one row per part. Each later round is a job of its own, built from
the stored answers of the round before: for every document still holding more than one answer, its
answers in order (``Part 1: …``) become the ``{text}`` of the combine template; when they do not all fit
one request, they are packed into as few consecutive groups as fit (the same exact token budget as the
parts), and another round follows. A group of one answer is carried over as it is. A document is done
when one answer is left; a document with a failed row (a part or a combination) fails as a whole.

Rounds are ordinary jobs on the same queue (the same workers, leases, result cache and exactly-once
writes). A round's key is derived from the job of the round before, so the same command again finds the
round it was in. The output has one line per document: a combined document's line carries the last
round's answer with ``usage`` summed over every row that went into it (parts and combinations); the
rows themselves go to the parts file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from tokenmill.dataset_fields import compile_template
from tokenmill.documents import PartBudget
from tokenmill.errors import UsageError
from tokenmill.output import failed_record, success_text
from tokenmill.rows import CHAT, DatasetRow, SamplingParams
from tokenmill.store import Store
from tokenmill.store.results import export_rows
from tokenmill.store.states import ResultStatus

DEFAULT_COMBINE_TEMPLATE = (
    "Combine these partial summaries of {name} into one summary of the whole document.\n\n{text}"
)
COMBINE_FIELDS = ("text", "name", "stem", "round")
PART_MARK = "#part-"


def round_key(previous_job: str, round_no: int, template: str) -> str:
    return hashlib.sha256(json.dumps(["combine", previous_job, round_no, template]).encode()).hexdigest()


@dataclass
class _Doc:
    """One document with more than one part, as the rounds reduce it."""

    source: str
    line: int  # the row position of its first part: where its one output line goes
    answers: list[str] = field(default_factory=list)
    slots: list[tuple[str, str]] = field(default_factory=list)  # ("row", custom_id) or ("carry", answer)
    parts: int = 0
    rounds: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: tuple[str, str] | None = None  # (code, message) of the first failed row
    last: Any = None  # the export row of its latest answer


class Reduction:
    """The map-reduce state of one run's multi-part documents, fed one finished round at a time."""

    def __init__(self, template: str, budget: PartBudget, params: SamplingParams) -> None:
        self.template = compile_template(template)
        unknown = [f for f in self.template.fields if f not in COMBINE_FIELDS]
        if unknown or "text" not in self.template.fields:
            allowed = ", ".join("{" + f + "}" for f in COMBINE_FIELDS)
            what = f"field {{{unknown[0]}}} is not available" if unknown else "must contain {text}"
            raise UsageError(f"combine template: {what} (use {allowed})")
        self.budget = budget
        self.params = params
        self.docs: dict[str, _Doc] = {}
        self._check_room()

    def _check_room(self) -> None:
        """Two answers of ``max_tokens`` each must fit one combine request, or no round makes progress."""
        answer = "word " * self.params.max_tokens
        probe = self.template.render(self._values("document.txt", self._join([answer, answer]), 99))
        if not self.budget.fits(probe):
            raise UsageError(
                f"--combine needs room for two answers of max_tokens {self.params.max_tokens} and the combined "
                f"answer in one {self.budget.n_ctx}-token request; lower --max-tokens or raise --n-ctx"
            )

    @staticmethod
    def _values(source: str, text: str, round_no: int) -> dict[str, str | int]:
        stem = source.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        return {"text": text, "name": source, "stem": stem, "round": round_no}

    @staticmethod
    def _join(answers: list[str], first: int = 1) -> str:
        return "\n\n".join(f"Part {first + i}: {a.strip()}" for i, a in enumerate(answers))

    def absorb(self, store: Store, job_id: str, parts_out: IO[str] | None, *, first_round: bool) -> None:
        """Take a finished round's answers (and failures) into each document; copy its rows to the parts file."""
        filled: dict[str, dict[str, str]] = {}
        for row in _rows(store, job_id):
            source = row.source or row.custom_id
            if first_round:
                if PART_MARK not in row.custom_id:
                    continue  # a one-part document: exported from the job as it is
                doc = self.docs.setdefault(source, _Doc(source, row.line))
                doc.parts += 1
                doc.slots.append(("row", row.custom_id))
            doc = self.docs[source]
            if row.status != ResultStatus.SUCCEEDED:
                doc.error = doc.error or (row.error_code or "generation_failed", f"{row.custom_id}: {row.error}")
                if parts_out is not None:
                    parts_out.write(json.dumps(failed_record(row), ensure_ascii=False) + "\n")
                continue
            body = json.loads(row.body_json or "{}")
            usage = body.get("usage") or {}
            doc.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            doc.completion_tokens += int(usage.get("completion_tokens") or 0)
            doc.last = row
            filled.setdefault(source, {})[row.custom_id] = _content(body)
            if parts_out is not None:
                parts_out.write(success_text(row))
        for doc in self.docs.values():
            got = filled.get(doc.source, {})
            if doc.error is None and doc.slots:
                doc.answers = [got.get(v, "") if kind == "row" else v for kind, v in doc.slots]
            doc.slots = []

    def open_docs(self) -> list[_Doc]:
        return [d for d in self.docs.values() if d.error is None and len(d.answers) > 1]

    def next_rows(self, round_no: int) -> list[DatasetRow]:
        """The rows of the next round: each open document's answers packed into groups that fit a request."""
        rows: list[DatasetRow] = []
        for doc in self.open_docs():
            doc.rounds = round_no
            start = 0
            for group in self._groups(doc):
                if len(group) == 1:
                    doc.slots.append(("carry", group[0]))
                else:
                    custom_id = f"{doc.source}#combine-{round_no}-{len(rows) + 1}"
                    prompt = self.template.render(self._values(doc.source, self._join(group, start + 1), round_no))
                    message = {"role": "user", "content": prompt}
                    rows.append(DatasetRow(len(rows) + 1, custom_id, CHAT, messages=(message,), params=self.params,
                                           source=doc.source))
                    doc.slots.append(("row", custom_id))
                start += len(group)
        return rows

    def _groups(self, doc: _Doc) -> Iterator[list[str]]:
        group: list[str] = []
        for answer in doc.answers:
            trial = [*group, answer]
            prompt = self.template.render(self._values(doc.source, self._join(trial), 99))
            if group and not self.budget.fits(prompt):
                yield group
                group = [answer]
            else:
                group = trial
        if group:
            yield group


def _content(body: dict[str, Any]) -> str:
    choices = body.get("choices") or [{}]
    message = choices[0].get("message") or {}
    return str(message.get("content") or choices[0].get("text") or "")


def _rows(store: Store, job_id: str) -> Iterator[Any]:
    with store.session() as s:
        yield from export_rows(s, job_id)


def combined_line(doc: _Doc) -> dict[str, Any]:
    """The document's one output line: the last round's answer, with the usage of every row that went into it."""
    row = doc.last
    body = json.loads(row.body_json or "{}")
    total = doc.prompt_tokens + doc.completion_tokens
    body["usage"] = {"prompt_tokens": doc.prompt_tokens, "completion_tokens": doc.completion_tokens,
                     "total_tokens": total}
    return {
        "id": f"batch_req_{row.job_id}_{row.seq}",
        "custom_id": doc.source,
        "response": {"status_code": 200, "request_id": f"{row.job_id}-{row.seq}", "body": body},
        "error": None,
        "tokenmill": {
            "line": doc.line, "source": doc.source, "parts": doc.parts, "combine_rounds": doc.rounds,
            "worker": row.worker_id, "model": row.variant, "cached": row.cached, "attempts": row.attempts,
            "timings": json.loads(row.timings_json or "{}"),
        },
    }  # fmt: skip


def write_documents(
    store: Store, map_job: str, reduction: Reduction, out: IO[str], errors: IO[str]
) -> tuple[int, int]:
    """One line per document, in document order: the map job's own line for a one-part document, the
    combined line for the others; failed documents go to ``errors``. Returns (answered, failed)."""
    ok = bad = 0
    for row in _rows(store, map_job):
        doc = reduction.docs.get(row.source or "") if PART_MARK in row.custom_id else None
        if doc is None:
            if row.status == ResultStatus.SUCCEEDED:
                out.write(success_text(row))
                ok += 1
            else:
                errors.write(json.dumps(failed_record(row), ensure_ascii=False) + "\n")
                bad += 1
            continue
        if row.line != doc.line:
            continue  # the document's line was written at its first part
        if doc.error is None and len(doc.answers) == 1 and doc.last is not None:
            out.write(json.dumps(combined_line(doc), ensure_ascii=False) + "\n")
            ok += 1
        else:
            code, message = doc.error or ("combine_incomplete", "the document's parts were not combined")
            record = {"id": None, "custom_id": doc.source, "response": None,
                      "error": {"code": code, "message": message, "line": doc.line}}  # fmt: skip
            errors.write(json.dumps(record, ensure_ascii=False) + "\n")
            bad += 1
    return ok, bad

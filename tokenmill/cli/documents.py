"""`tokenmill run` on a folder of documents: the context its requests need, and `--combine`'s rounds.

The sizing is in :mod:`tokenmill.scheduler.context` and the map-reduce in :mod:`tokenmill.scheduler.combine`;
this module wires them to the command: it loads the model's tokenizer, prints the choice, and drives one
job per combine round on the run's own workers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenmill.cli.common import console
from tokenmill.config import Settings
from tokenmill.documents import load_template
from tokenmill.errors import UsageError
from tokenmill.models.catalog import get_family, parse_model_ref
from tokenmill.models.quantize import catalog_with_local
from tokenmill.models.resolve import looks_like_path
from tokenmill.models.sizing import Prefer
from tokenmill.models.tokenizer import tokenizer_for
from tokenmill.rows import DatasetRow, SamplingParams
from tokenmill.scheduler.combine import DEFAULT_COMBINE_TEMPLATE, Reduction, round_key, write_documents
from tokenmill.scheduler.context import ContextChoice, Host, choose_context, with_context
from tokenmill.scheduler.submit import Submission, submit_rows
from tokenmill.store import Store, leases
from tokenmill.store import jobs as store_jobs
from tokenmill.store.states import ACTIVE_STATES, JobState
from tokenmill.workers.capacity import detect


def size_context(
    settings: Settings, sub: Submission, n_ctx: int | None, n_seq: int | None, share: int, prefer: Prefer
) -> tuple[Submission, ContextChoice | None]:
    """The submission with its context chosen (and, for documents, the tokenizer that cuts them)."""
    # Documents are cut with it; a bare .gguf is read for its trained context.
    wanted = sub.path.is_dir() or looks_like_path(sub.model)
    tokenizer = tokenizer_for(sub.model, settings.models_dir, fetch=True) if wanted else None
    if sub.path.is_dir() and tokenizer is None:
        console.print(f"warning: no local file of {sub.model} to count tokens with; parts are sized at about "
                      "4 characters per token", soft_wrap=True)
    family = pinned = None
    if not looks_like_path(sub.model):
        catalog = catalog_with_local(settings.models_dir)
        name, pinned = parse_model_ref(sub.model, catalog)
        family = get_family(name, catalog)
    host = Host(family, detect(), share=share, prefer=prefer, pinned=pinned)
    choice = choose_context(sub, tokenizer, host, n_ctx=n_ctx, n_seq=n_seq)
    if choice is not None:
        console.print(choice.note, soft_wrap=True)
    return with_context(sub, choice, tokenizer), choice


def make_reduction(sub: Submission, template: str | None) -> Reduction:
    """The combine rounds' state, checked before any work: a bad template or no room is a usage error now."""
    budget = sub.part_budget()
    if budget is None:
        raise UsageError(f"--combine needs the tokenizer of {sub.model}: pull the model first")
    params = sub.defaults or SamplingParams()
    return Reduction(load_template(template) if template else DEFAULT_COMBINE_TEMPLATE, budget, params)


def parts_path(output: Path) -> Path:
    name = output.name[: -len(".jsonl")] if output.name.endswith(".jsonl") else output.name
    return output.with_name(f"{name}.parts.jsonl")


@dataclass(frozen=True)
class Combined:
    answered: int
    failed: int
    combined: int  # documents whose answer was combined from parts
    rounds: int
    parts: Path


def run_rounds(
    store: Store,
    sub: Submission,
    reduction: Reduction,
    map_job: str,
    drive: Callable[[str], None],
    output: Path,
    errors: Path,
) -> Combined:
    """Combine rounds until every document has one answer, then write one line per document (module doc of
    :mod:`tokenmill.scheduler.combine`). ``drive`` runs one job to its end on the run's workers."""
    parts = parts_path(output)
    with open(parts, "w", encoding="utf-8") as parts_out:
        reduction.absorb(store, map_job, parts_out, first_round=True)
        previous, round_no = map_job, 0
        while reduction.open_docs():
            round_no += 1
            rows = reduction.next_rows(round_no)
            job_id = _round_job(store, sub, map_job, previous, round_no, rows, reduction)
            with store.session() as s:
                unfinished = leases.unfinished_chunks(s, job_id) > 0
            if unfinished:
                console.print(f"combine round {round_no}: job {job_id}, {len(rows)} rows "
                              f"for {len(reduction.open_docs())} documents")
                drive(job_id)
            reduction.absorb(store, job_id, parts_out, first_round=False)
            previous = job_id
    for path in (output, errors):
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8") as out, open(errors, "w", encoding="utf-8") as err:
        ok, bad = write_documents(store, map_job, reduction, out, err)
    combined = sum(1 for d in reduction.docs.values() if d.error is None)
    return Combined(ok, bad, combined, round_no, parts)


def _round_job(
    store: Store,
    sub: Submission,
    map_job: str,
    previous: str,
    round_no: int,
    rows: list[DatasetRow],
    reduction: Reduction,
) -> str:
    """The job of one round: found again by its key when the same command runs again, else stored."""
    key = round_key(previous, round_no, reduction.template.text)
    with store.session() as s:
        existing = store_jobs.find_resumable(s, key)
        if existing is not None and (existing.state in ACTIVE_STATES or existing.state == JobState.COMPLETED):
            return existing.id
        job = store_jobs.get_job(s, map_job)
        family, pinned, chunk_size = job.family, job.pinned_variant, job.chunk_size
        options = {**job.options, "combine_round": round_no, "combine_of": previous}
    quant = pinned.split(":", 1)[1] if pinned else None
    return submit_rows(store, rows, name=f"{sub.path} (combine round {round_no})", key=key, family=family,
                       pinned_quant=quant, chunk_size=chunk_size, options=json.loads(json.dumps(options)))

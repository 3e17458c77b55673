"""`tokenmill run`: the whole job on this machine — store, broker, workers, scheduler, outputs."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tokenmill.cache import close_answered_chunks, prefill
from tokenmill.celery_app import check_broker, make_app
from tokenmill.cli.common import console, default_output, open_store, out, settings_from
from tokenmill.errors import DatasetError, JobIncomplete, ModelError
from tokenmill.output import export
from tokenmill.rows import SamplingParams
from tokenmill.scheduler.dispatch import Dispatcher
from tokenmill.scheduler.submit import (
    Submission,
    auto_chunk_size,
    choose_model,
    job_key,
    model_route,
    submit_dataset,
)
from tokenmill.store import Store, leases
from tokenmill.store import jobs as store_jobs
from tokenmill.store import workers as store_workers
from tokenmill.workers.capacity import detect
from tokenmill.workers.local import LocalFleet, default_worker_count
from tokenmill.workers.selection import WorkerOptions, select_model

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Catalog name[:variant] or path to a .gguf file [default: the lines' body.model when it names a "
        "catalog model, else smollm2-135m-instruct]",
        show_default=False,
    ),
]
TemplateOpt = Annotated[
    str | None, typer.Option(help="Prompt template with {field} placeholders, or a file holding one")
]
FieldOpt = Annotated[str | None, typer.Option("--field", help="Take the prompt from this field of each line")]
MaxTokensOpt = Annotated[int | None, typer.Option(help="Default max_tokens for lines that set none", min=1)]
TemperatureOpt = Annotated[float | None, typer.Option(help="Default temperature for lines that set none")]
ChunkOpt = Annotated[
    int | None, typer.Option(help="Rows per chunk, the unit a worker leases [default: from the data]", min=1)
]
AllowUnknownOpt = Annotated[
    bool,
    typer.Option(help="Ignore request fields tokenmill does not know (one warning per field) instead of failing"),
]
SkipOpt = Annotated[bool, typer.Option(help="Run the valid lines; write bad ones to the errors file")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Generate even when an identical answer is stored")]
TokenBudgetOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Documents only: split files longer than this many tokens (about 4 characters each) into "
        "'FILE#part-K' rows (default: what a 2048-token context leaves after max_tokens and 256 for the "
        "template, 1536 with the default max_tokens)",
        show_default=False,
    ),
]


def build_submission(
    path: Path,
    model: str,
    template: str | None,
    field: str | None,
    max_tokens: int | None,
    temperature: float | None,
    chunk_size: int | None,
    skip_invalid: bool,
    no_cache: bool,
    token_budget: int | None = None,
    allow_unknown_fields: bool = False,
    model_source: str = "--model",
) -> Submission:
    base = SamplingParams()
    defaults = SamplingParams(
        max_tokens=max_tokens or base.max_tokens,
        temperature=base.temperature if temperature is None else temperature,
    )
    return Submission(
        path=path,
        model=model,
        template=template,
        text_field=field,
        defaults=defaults,
        chunk_size=chunk_size,
        skip_invalid=skip_invalid,
        no_cache=no_cache,
        token_budget=token_budget,
        allow_unknown_fields=allow_unknown_fields,
        model_source=model_source,
    )


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        ctx: typer.Context,
        path: Annotated[Path, typer.Argument(help="JSONL dataset (or a folder of .txt/.md with --template)")],
        model: ModelOpt = None,
        output: Annotated[Path | None, typer.Option("--output", "-o", help="Results JSONL")] = None,
        errors: Annotated[Path | None, typer.Option("--errors", help="Failed rows JSONL")] = None,
        template: TemplateOpt = None,
        field: FieldOpt = None,
        max_tokens: MaxTokensOpt = None,
        temperature: TemperatureOpt = None,
        chunk_size: ChunkOpt = None,
        workers: Annotated[int | None, typer.Option(help="Local worker processes (default: by cores)")] = None,
        threads: Annotated[int | None, typer.Option(help="Threads per worker process")] = None,
        n_seq: Annotated[int | None, typer.Option(help="Sequences decoded together per worker")] = None,
        skip_invalid: SkipOpt = False,
        no_cache: NoCacheOpt = False,
        token_budget: TokenBudgetOpt = None,
        allow_unknown_fields: AllowUnknownOpt = False,
    ) -> None:
        """Run a dataset end to end on this machine; the same command again resumes.

        Example: tokenmill run docs.jsonl --model smollm2-135m-instruct -o docs.results.jsonl
        """
        settings = settings_from(ctx)
        model, model_source = choose_model(path, model)
        count, each = default_worker_count()
        count = workers or count
        sub = build_submission(
            path, model, template, field, max_tokens, temperature, chunk_size, skip_invalid, no_cache, token_budget,
            allow_unknown_fields, model_source,
        )  # fmt: skip
        output = output or default_output(path, "results")
        errors = errors or default_output(path, "errors")
        model_route(model)
        if not path.exists():
            raise DatasetError(str(path), "no such file or directory")
        store = open_store(settings)
        app_ = make_app(settings)
        check_broker(app_, settings)
        started = time.monotonic()
        key = job_key(path, model, sub.options())
        with store.session() as s:
            existing = store_jobs.find_resumable(s, key)
            job_id = existing.id if existing and existing.state in ("queued", "running") else None
        if job_id:
            console.print(f"resuming job {job_id}")
        else:
            local_chunks = auto_chunk_size(path, workers=count) if chunk_size is None and path.is_file() else None
            job_id, rows, invalid = submit_dataset(store, sub, errors_out=errors, chunk_size=local_chunks)
            console.print(f"job {job_id}: {rows} rows" + (f", {invalid} invalid lines → {errors}" if invalid else ""))
            print_ignored(sub)
        # Resolve (fetch, verify) the model once here, so local workers do not race for it, and answer
        # rows an identical earlier request already answered before any worker starts.
        sel = select_model(settings, WorkerOptions(model=model, n_seq=n_seq, share=count), detect())
        if not no_cache:
            served = prefill(store, job_id, sel.model_id)
            if served:
                close_answered_chunks(store, job_id)
                console.print(f"{served} rows answered from the result cache")
        with store.session() as s:
            fleet_needed = leases.unfinished_chunks(s, job_id) > 0
        fleet = LocalFleet(settings, model, count, threads or each, n_seq=n_seq)
        dispatcher = Dispatcher(store, app_, settings)
        stop = threading.Event()
        loop = threading.Thread(target=dispatcher.run, args=(stop, job_id), daemon=True)
        if fleet_needed:
            fleet.start()
        loop.start()
        finished = False
        try:
            _watch(store, job_id, fleet if fleet_needed else None)
            finished = True
        finally:
            stop.set()
            loop.join(timeout=10)
            # A finished job leaves its workers idle with every result committed, and an idle Celery
            # worker needs ~4 s to wind down; after an interrupt they get a moment to let go of a row.
            killed = fleet.stop(grace=0.0 if finished else 1.0)
            with store.session() as s:
                store_workers.mark_stopped(s, socket.gethostname(), killed)
        wall = time.monotonic() - started
        ok, bad = export(store, job_id, output, errors)
        with store.session() as s:
            prog = store_jobs.progress(s, store_jobs.get_job(s, job_id))
        _summary(prog.to_json(), wall, output, errors if bad else None, sub)
        if bad:
            raise JobIncomplete(f"{bad} of {ok + bad} rows failed; see {errors}")


def _watch(store: Store, job_id: str, fleet: LocalFleet | None) -> None:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("rows", total=None, tps="0.0")
        while True:
            with store.session() as s:
                job = store_jobs.get_job(s, job_id)
                prog = store_jobs.progress(s, job)
                state = job.state
                failed_workers = [w for w in store_workers.list_workers(s) if w.state == "failed" and w.error]
            info = prog.to_json()
            bar.update(task, total=prog.total, completed=prog.done, tps=f"{info['tokens_per_second']:.1f}")
            if state not in ("queued", "running"):
                return
            if fleet is not None and fleet.alive() == 0:
                reason = failed_workers[-1].error if failed_workers else "see .tokenmill/logs/"
                raise ModelError(f"every local worker exited before the job finished: {reason}")
            time.sleep(0.25)


def print_ignored(sub: Submission) -> None:
    """One warning per unknown field name let through by --allow-unknown-fields (data, so no markup)."""
    for warning in sub.ignored.warnings():
        console.print(f"warning: {warning}", markup=False, highlight=False)


def _summary(info: dict[str, object], wall: float, output: Path, errors: Path | None, sub: Submission) -> None:
    table = Table(title="tokenmill run", show_header=False)
    table.add_row("job", str(info["job"]))
    table.add_row("state", str(info["state"]))
    table.add_row("rows", f"{info['succeeded']} succeeded, {info['failed']} failed, {info['cached']} cached")
    table.add_row("tokens", f"{info['prompt_tokens']} prompt, {info['completion_tokens']} generated")
    table.add_row("wall time", f"{wall:.1f} s")
    ct = info["completion_tokens"]
    table.add_row("throughput", f"{(ct if isinstance(ct, int) else 0) / wall:.1f} generated tok/s end to end")
    table.add_row("results", str(output))
    if errors:
        table.add_row("errors", str(errors))
    if sub.ignored.total:
        names = len(sub.ignored.lines)
        table.add_row("ignored fields", f"{names} unknown field name{'s' * (names != 1)} on {sub.ignored.total} lines")
    out.print(table)

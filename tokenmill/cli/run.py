"""`tokenmill run`: the whole job on this machine — store, broker, workers, scheduler, outputs."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from celery import Celery
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from tokenmill.cache import close_answered_chunks, prefill, weights_identity
from tokenmill.celery_app import check_broker, make_app
from tokenmill.cli.common import console, default_output, open_store, out, settings_from
from tokenmill.cli.documents import Combined, make_reduction, run_rounds, size_context
from tokenmill.cli.options import (
    AllowUnknownOpt,
    ChunkOpt,
    DatasetArg,
    DeadlineOpt,
    FailedRowsOpt,
    FieldOpt,
    JobNCtxOpt,
    MaxTokensOpt,
    ModelOpt,
    NoCacheOpt,
    OutputOpt,
    OverlapOpt,
    PreferChoice,
    PreferOpt,
    SkipOpt,
    TemperatureOpt,
    TemplateOpt,
    TokenBudgetOpt,
    build_submission,
    prefer_value,
    print_ignored,
)
from tokenmill.cli.phases import Phases
from tokenmill.cli.planning import choose_for_job, this_host
from tokenmill.cli.progress import LogProgress
from tokenmill.cli.startup import FleetStarter
from tokenmill.config import Settings
from tokenmill.errors import DatasetError, JobIncomplete, ModelError, UsageError
from tokenmill.models.sizing import Prefer
from tokenmill.output import export, read_skipped
from tokenmill.scheduler.dispatch import Dispatcher
from tokenmill.scheduler.plan import FleetMember
from tokenmill.scheduler.submit import (
    DEFAULT_CONTEXT,
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
from tokenmill.store.states import ACTIVE_STATES, JobState, WorkerState
from tokenmill.workers.capacity import detect, usable_gpus
from tokenmill.workers.diskfull import FullWatch
from tokenmill.workers.local import LocalFleet, default_worker_count
from tokenmill.workers.selection import WorkerOptions, select_model


def run_cmd(
    ctx: typer.Context,
    path: DatasetArg,
    model: ModelOpt = None,
    output: OutputOpt = None,
    errors: FailedRowsOpt = None,
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
    prefer: PreferOpt = PreferChoice.balanced,
    deadline: DeadlineOpt = None,
    allow_unknown_fields: AllowUnknownOpt = False,
    n_ctx: JobNCtxOpt = None,
    overlap: OverlapOpt = 0,
    combine: Annotated[
        bool,
        typer.Option(help="Documents only: combine the answers to a long document's parts into one answer per "
                     "document (map-reduce rounds; the parts go to RESULTS.parts.jsonl)"),
    ] = False,
    combine_template: Annotated[
        str | None,
        typer.Option(help="With --combine: the template that combines a document's answers ({text}: the answers; "
                     "{name}, {stem}, {round}) [default: 'Combine these partial summaries of {name} into one "
                     "summary of the whole document.']", show_default=False),
    ] = None,
) -> None:
    """Run a dataset end to end on this machine; the same command again resumes.

    Example: tokenmill run docs.jsonl --model smollm2-135m-instruct -o docs.results.jsonl
    """
    settings = settings_from(ctx)
    model, model_source = choose_model(path, model)
    gpus = usable_gpus()  # one worker per GPU, each pinned to its own (asks llama.cpp only if NVML finds one)
    count, each = default_worker_count(len(gpus))
    count = workers or count
    sub = build_submission(
        path, model, template, field, max_tokens, temperature, chunk_size, skip_invalid, no_cache, token_budget,
        settings.models_dir, allow_unknown_fields, model_source, settings.engine, overlap=overlap,
    )  # fmt: skip
    output = output or default_output(path, "results")
    errors = errors or default_output(path, "errors")
    model_route(model, settings.models_dir)
    if not path.exists():
        raise DatasetError(str(path), "no such file or directory")
    if (combine or overlap or combine_template) and not path.is_dir():
        raise UsageError("--combine, --combine-template and --overlap are for a folder of documents")
    phases = Phases()
    pref = prefer_value(prefer)
    sub, context = size_context(settings, sub, n_ctx, n_seq, count, pref)
    n_seq = context.n_seq if context else n_seq
    sub, job_deadline = _plan(settings, sub, pref, deadline, count, threads or each, n_seq)
    reduction = make_reduction(sub, combine_template) if combine or combine_template else None
    # Lines --skip-invalid refused, kept by job key so a resumed run still reports them (export merges).
    skipped = settings.data_dir / "skipped" / f"{job_key(path, sub.model, sub.options())}.jsonl"
    fleet = LocalFleet(settings, sub.model, count, threads or each, n_seq=n_seq, prefer=pref, schema_gate=True,
                       n_ctx=sub.n_ctx, gpu_pins=[g.cuda_id for g in gpus])  # fmt: skip
    opts = WorkerOptions(model=sub.model, n_seq=n_seq, n_ctx=sub.n_ctx or DEFAULT_CONTEXT, share=count, prefer=pref)
    starter = FleetStarter(lambda: select_model(settings, opts, detect()), fleet)
    starter.start()  # the workers import and load the model while this process opens the store and the broker
    store, app_ = _open_for(starter, settings)
    started = time.monotonic()
    job_id, fleet_needed = _submit_while_workers_start(store, settings, sub, starter, skipped, errors,
                                                       job_deadline, phases, keep_fleet=reduction is not None)
    dispatcher = Dispatcher(store, app_, settings)

    def drive(job: str) -> None:
        _drive(store, dispatcher, job, fleet if fleet_needed or reduction else None, settings, job_deadline)

    finished = False
    try:
        drive(job_id)
        combined = run_rounds(store, sub, reduction, job_id, drive, output, errors) if reduction else None
        finished = True
    finally:
        if fleet_needed or reduction:
            _stop_fleet(store, fleet, finished=finished)
    if combined is not None:
        _finish_combined(store, job_id, combined, output, errors, time.monotonic() - started, sub)
        return
    _finish(store, job_id, output, errors, skipped, time.monotonic() - started, sub, phases)


def register(app: typer.Typer) -> None:
    app.command("run")(run_cmd)


def _open_for(starter: FleetStarter, settings: Settings) -> tuple[Store, Celery]:
    """The store (migrated: then the workers started before it may touch it) and the broker, checked; the
    workers are stopped again when either cannot be reached."""
    try:
        store = open_store(settings)
        starter.fleet.open_gate()
        app_ = make_app(settings)
        check_broker(app_, settings)
    except BaseException:
        if starter.abandon():
            starter.fleet.stop(grace=0.0)
        raise
    return store, app_


def _submit_while_workers_start(
    store: Store,
    settings: Settings,
    sub: Submission,
    starter: FleetStarter,
    skipped: Path,
    errors: Path,
    deadline: float | None,
    phases: Phases,
    *,
    keep_fleet: bool = False,
) -> tuple[str, bool]:
    """(job id, whether rows are left for workers). The workers resolve nothing themselves: the model is
    resolved once, then they start importing and loading it while the store is opened and the dataset
    validated and stored (start-up in parallel, not in series); they are stopped again if storing fails or
    nothing is left."""
    fleet = starter.fleet
    try:
        job_id = _resume_or_submit(store, sub, skipped, errors, fleet.count, deadline, reuse_completed=keep_fleet)
        phases.stored = time.time()
        fleet_needed = _answer_from_cache(
            store, job_id, sub, weights_identity(starter.wait().model_id, settings.engine)
        )
        phases.spawned = fleet.spawned_at
    except BaseException:
        if starter.abandon():
            _stop_fleet(store, fleet, finished=False)
        raise
    if not fleet_needed and not keep_fleet:
        _stop_fleet(store, fleet, finished=True)
    return job_id, fleet_needed


def _plan(
    settings: Settings,
    sub: Submission,
    prefer: Prefer,
    deadline: str | None,
    count: int,
    threads: int,
    n_seq: int | None = None,
) -> tuple[Submission, float | None]:
    """The submission pinned to what --prefer/--deadline choose for this host's local workers (a pin
    never falls back, so only variants this host has or a package registry gives are candidates)."""

    def here() -> list[FleetMember]:
        return this_host(settings, detect(), count, threads, n_ctx=sub.n_ctx, n_seq=n_seq)

    choice = choose_for_job(settings, sub, prefer, deadline, here, sources=("local", "registry"))
    return (replace(sub, model=choice.pin) if choice.pin else sub), choice.deadline


def _resume_or_submit(
    store: Store,
    sub: Submission,
    skipped: Path,
    errors: Path,
    workers: int,
    deadline: float | None,
    *,
    reuse_completed: bool = False,
) -> str:
    """The same command again resumes its unfinished job instead of storing the dataset twice; lines
    --skip-invalid refuses go to ``skipped`` until the export merges them into ``errors``. With
    ``reuse_completed`` (--combine), a job whose every row succeeded is taken as it is: its combine rounds
    go on from its stored answers."""
    key = job_key(sub.path, sub.model, sub.options())
    with store.session() as s:
        existing = store_jobs.find_resumable(s, key)
        reusable = existing is not None and (
            existing.state in ACTIVE_STATES or (reuse_completed and existing.state == JobState.COMPLETED)
        )
        job_id = existing.id if existing is not None and reusable else None
    if job_id:
        console.print(f"resuming job {job_id}")
        return job_id
    path = sub.path
    local_chunks = auto_chunk_size(path, workers=workers) if sub.chunk_size is None and path.is_file() else None
    job_id, rows, invalid = submit_dataset(
        store, sub, errors_out=skipped, chunk_size=local_chunks, deadline=deadline
    )
    console.print(f"job {job_id}: {rows} rows" + (f", {invalid} invalid lines → {errors}" if invalid else ""))
    print_ignored(sub)
    return job_id


def _answer_from_cache(store: Store, job_id: str, sub: Submission, model_id: str) -> bool:
    """Answer rows an identical earlier request already answered before any chunk is sent. True when rows
    are left to run."""
    if not sub.no_cache:
        served = prefill(store, job_id, model_id)
        if served:
            close_answered_chunks(store, job_id)
            console.print(f"{served} rows answered from the result cache")
    with store.session() as s:
        return leases.unfinished_chunks(s, job_id) > 0


def _drive(
    store: Store,
    dispatcher: Dispatcher,
    job_id: str,
    fleet: LocalFleet | None,
    settings: Settings,
    deadline: float | None = None,
) -> None:
    """Dispatch on a thread until the job ends, showing progress: a bar on a terminal, lines in a log. The
    caller stops the local workers (none when the cache answered everything) however this ends."""
    stop = threading.Event()
    full = FullWatch(store, fleet)  # the disk fills meanwhile: exit 6 with one line (workers/diskfull.py)
    loop = threading.Thread(target=dispatcher.run, args=(stop, job_id), daemon=True)
    loop.start()
    lines = None if console.is_terminal else LogProgress(sys.stderr, settings.progress_seconds)
    try:
        _watch(store, job_id, fleet, full.check, lines, deadline)
    finally:
        stop.set()
        loop.join(timeout=10)


def _stop_fleet(store: Store, fleet: LocalFleet, *, finished: bool) -> None:
    """A finished job leaves its workers idle with every result committed (a chunk completes only after
    its rows are flushed), and an idle Celery worker needs ~4 s to wind down: kill them at once. After an
    interrupt they get a moment to let go of a row."""
    killed = fleet.stop(grace=0.0 if finished else 1.0)
    with store.session() as s:
        store_workers.mark_stopped(s, socket.gethostname(), killed)


def _finish(
    store: Store, job_id: str, output: Path, errors: Path, skipped: Path, wall: float, sub: Submission, phases: Phases
) -> None:
    """Write the outputs (failed rows and skipped lines together in ``errors``) and the summary; exit 7
    when not every line was answered."""
    ok, bad = export(store, job_id, output, errors, skipped=skipped)
    n_skipped = len(read_skipped(skipped))
    with store.session() as s:
        job = store_jobs.get_job(s, job_id)
        prog = store_jobs.progress(s, job)
        timeline = phases.line(leases.first_claimed_at(s, job_id), job.finished_at)
    info = {**prog.to_json(), "phases": timeline, "engine_busy": job.busy_fraction, "decode_steps": job.decode_steps}
    _summary(info, wall, output, errors if bad or n_skipped else None, sub, n_skipped)
    if bad or n_skipped:
        what = [f"{bad} of {ok + bad} rows failed"] if bad else []
        what += [f"{n_skipped} invalid lines skipped"] if n_skipped else []
        raise JobIncomplete(f"{', '.join(what)}; see {errors}")


# `run` shares two cores with the decode threads: a look at the job's state every POLL_S (one indexed
# read) notices the end at once; the fuller progress read and the bar's redraw come every PROGRESS_S.
POLL_S = 0.25
PROGRESS_S = 1.0


def _watch(
    store: Store,
    job_id: str,
    fleet: LocalFleet | None,
    check: Callable[[], None] = lambda: None,
    lines: LogProgress | None = None,
    deadline: float | None = None,
) -> None:
    if lines is not None:  # stderr is a log: plain lines at a steady interval (cli/progress.py)

        def show_line(final: bool) -> None:
            with store.session() as s:
                info = store_jobs.progress(s, store_jobs.get_job(s, job_id)).to_json()
            lines.update(info, deadline, final=final)

        _poll(store, job_id, fleet, check, show_line)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    # No auto-refresh thread: redrawn after each progress read, which is as often as anything changes.
    with Progress(*columns, console=console, transient=False, auto_refresh=False) as bar:
        task = bar.add_task("rows", total=None, tps="0.0")
        _poll(store, job_id, fleet, check, lambda _final: _show_progress(store, job_id, bar, task))


def _poll(
    store: Store, job_id: str, fleet: LocalFleet | None, check: Callable[[], None], show: Callable[[bool], None]
) -> None:
    next_progress = 0.0
    while True:
        if time.monotonic() >= next_progress:
            show(False)
            next_progress = time.monotonic() + PROGRESS_S
        with store.session() as s:
            state = store_jobs.state_of(s, job_id)
        if state not in ACTIVE_STATES:
            show(True)
            return
        check()  # before the fleet check: a worker that exited on a full disk is exit 6, not a dead fleet
        if fleet is not None and fleet.alive() == 0:
            with store.session() as s:
                failed = [w for w in store_workers.list_workers(s) if w.state == WorkerState.FAILED and w.error]
            reason = failed[-1].error if failed else "see .tokenmill/logs/"
            raise ModelError(f"every local worker exited before the job finished: {reason}")
        time.sleep(POLL_S)


def _show_progress(store: Store, job_id: str, bar: Progress, task: TaskID) -> None:
    with store.session() as s:
        prog = store_jobs.progress(s, store_jobs.get_job(s, job_id))
    info = prog.to_json()
    bar.update(task, total=prog.total, completed=prog.done, tps=f"{info['tokens_per_second']:.1f}")
    bar.refresh()


def _finish_combined(
    store: Store, job_id: str, combined: Combined, output: Path, errors: Path, wall: float, sub: Submission
) -> None:
    """The summary of a --combine run: one line per document, the parts and rounds behind them; exit 7 when a
    document got no answer."""
    with store.session() as s:
        info: dict[str, object] = {**store_jobs.progress(s, store_jobs.get_job(s, job_id)).to_json(),
                                   "engine_busy": None}
    _summary(info, wall, output, errors if combined.failed else None, sub)
    out.print(f"documents: {combined.answered} answered ({combined.combined} combined from their parts in "
              f"{combined.rounds} rounds), {combined.failed} failed; parts in {combined.parts}")
    if combined.failed:
        total = combined.answered + combined.failed
        raise JobIncomplete(f"{combined.failed} of {total} documents failed; see {errors}")


def _summary(
    info: dict[str, object], wall: float, output: Path, errors: Path | None, sub: Submission, skipped: int = 0
) -> None:
    table = Table(title="tokenmill run", show_header=False)
    table.add_row("job", str(info["job"]))
    table.add_row("state", str(info["state"]))
    table.add_row("rows", f"{info['succeeded']} succeeded, {info['failed']} failed, {info['cached']} cached")
    if skipped:
        table.add_row("skipped", f"{skipped} invalid lines (not run; in the errors file)")
    table.add_row("tokens", f"{info['prompt_tokens']} prompt, {info['completion_tokens']} generated")
    table.add_row("wall time", f"{wall:.1f} s")
    if info.get("phases"):
        table.add_row("phases", str(info["phases"]))
    busy = info.get("engine_busy")
    if isinstance(busy, float):
        table.add_row("engine busy", f"{busy:.1%} of slots filled over {info['decode_steps']:,} decode steps")
    ct = info["completion_tokens"]
    table.add_row("throughput", f"{(ct if isinstance(ct, int) else 0) / wall:.1f} generated tok/s end to end")
    table.add_row("results", str(output))
    if errors:
        table.add_row("errors", str(errors))
    if sub.ignored.total:
        names = len(sub.ignored.lines)
        plural = "s" * (names != 1)
        table.add_row("ignored fields", f"{names} unknown field name{plural} on {sub.ignored.total} lines")
    out.print(table)

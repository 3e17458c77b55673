"""Job commands for a fleet: submit, status, results, jobs, cancel, retry."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from tokenmill.cli.common import (
    console,
    open_store,
    out,
    print_plain,
    scheduler_state,
    settings_from,
)
from tokenmill.cli.options import (
    AllowUnknownOpt,
    ChunkOpt,
    DatasetArg,
    DeadlineOpt,
    FailedRowsOpt,
    FieldOpt,
    JobArg,
    JsonOpt,
    MaxTokensOpt,
    ModelOpt,
    NoCacheOpt,
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
from tokenmill.cli.planning import JobChoice, choose_for_job, deadline_note, live_fleet
from tokenmill.cli.tables import Column, print_fitted
from tokenmill.config import Settings
from tokenmill.errors import DatasetError, JobIncomplete, UsageError
from tokenmill.models.tokenizer import tokenizer_for
from tokenmill.output import export
from tokenmill.scheduler.context import Host, choose_context, with_context
from tokenmill.scheduler.submit import Submission, choose_model, model_route, submit_dataset
from tokenmill.store import Store
from tokenmill.store import jobs as store_jobs
from tokenmill.store import workers as store_workers
from tokenmill.store.clock import db_now
from tokenmill.store.states import UNFINISHED_STATES, JobState
from tokenmill.workers.capacity import detect


def submit_cmd(
    ctx: typer.Context,
    path: DatasetArg,
    model: ModelOpt = None,
    template: TemplateOpt = None,
    field: FieldOpt = None,
    max_tokens: MaxTokensOpt = None,
    temperature: TemperatureOpt = None,
    chunk_size: ChunkOpt = None,
    errors: Annotated[Path | None, typer.Option("--errors", help="Where rejected lines go")] = None,
    skip_invalid: SkipOpt = False,
    no_cache: NoCacheOpt = False,
    token_budget: TokenBudgetOpt = None,
    ab: Annotated[str | None, typer.Option("--ab", help="Run every row on two variants: VARIANT_A,VARIANT_B")] = None,
    prefer: PreferOpt = PreferChoice.balanced,
    deadline: DeadlineOpt = None,
    allow_unknown_fields: AllowUnknownOpt = False,
    n_ctx: Annotated[
        int | None,
        typer.Option("--n-ctx", min=64, show_default=False,
                     help="The context per request of the fleet's workers (their --n-ctx), which documents are cut "
                     "to fit [default: 2048, a worker's default]"),
    ] = None,
    overlap: OverlapOpt = 0,
) -> None:
    """Store a dataset as a job for the fleet; prints the job id on the last line.

    Example: tokenmill submit docs.jsonl --model smollm2-135m-instruct --chunk-size 32
    """
    settings = settings_from(ctx)
    model, model_source = choose_model(path, model)
    sub = build_submission(
        path, model, template, field, max_tokens, temperature, chunk_size, skip_invalid, no_cache, token_budget,
        settings.models_dir, allow_unknown_fields, model_source, settings.engine, n_ctx=n_ctx, overlap=overlap,
    )  # fmt: skip
    if path.is_dir():
        sub = _exact_budget(settings, sub, n_ctx)
    pins = _ab_pins(model, ab)
    for pin in pins:
        model_route(pin or model, settings.models_dir)
    if not path.exists():  # before the store is touched, as `run` does
        raise DatasetError(str(path), "no such file or directory")
    store = open_store(settings)
    choice = JobChoice(None, None)
    if ab is None:
        choice = choose_for_job(
            settings, sub, prefer_value(prefer), deadline, lambda: live_fleet(store, settings, detect())
        )
        pins = [choice.pin]
        if choice.pin:
            _warn_if_unserved(store, settings, choice.pin)
    elif deadline is not None:
        raise UsageError("--deadline picks one variant; it cannot be combined with --ab")
    group = uuid.uuid4().hex[:12] if ab else None
    ids = []
    for pin in pins:
        job_id, rows, invalid = submit_dataset(
            store, sub, errors_out=errors, ab_group=group, pin=pin, deadline=choice.deadline
        )
        ids.append(job_id)
    skipped = f", {invalid} invalid lines skipped" + (f" → {errors}" if errors else "") if invalid else ""
    print_ignored(sub)
    console.print(f"{rows} rows stored" + (f" twice (A/B group {group})" if group else "") + skipped)
    for job_id in ids:
        print_plain(job_id)


def _exact_budget(settings: Settings, sub: Submission, n_ctx: int | None) -> Submission:
    """Documents are cut with the model's tokenizer when a file of it is on this host (no fetch: a submitting
    host need not hold models), to the fleet's context, which a submit cannot see: --n-ctx or the default."""
    tokenizer = tokenizer_for(sub.model, settings.models_dir)
    if tokenizer is None:
        console.print(f"warning: no local file of {sub.model} to count tokens with; parts are sized at about "
                      "4 characters per token", soft_wrap=True)
        return sub
    choice = choose_context(sub, tokenizer, Host(None, None), n_ctx=n_ctx) if n_ctx else None
    return with_context(sub, choice, tokenizer)


def _warn_if_unserved(store: Store, settings: Settings, pin: str) -> None:
    """A pinned job waits for a worker that loaded that variant: say how to start one when none has."""
    lost_after = settings.lost_after
    with store.session() as s:
        now = db_now(s)
        serving = [w for w in store_workers.list_workers(s)
                   if w.variant == pin and store_workers.effective_state(w, lost_after, now) in ("ready", "busy")]
    if not serving:
        hint = f"no live worker serves {pin} yet: start one with `tokenmill worker --model {pin}`"
        console.print(hint, soft_wrap=True)


def _ab_pins(model: str, ab: str | None) -> list[str | None]:
    """The variant each job of a submission is pinned to: none for a plain job, two for an A/B pair
    (a bare quant such as ``q8_0`` belongs to the --model family)."""
    if not ab:
        return [None]
    family = model.split(":", 1)[0]
    parts = [p.strip() for p in ab.split(",") if p.strip()]
    if len(parts) != 2:
        raise UsageError(f"--ab takes two variants separated by a comma, got {ab!r}")
    return [p if ":" in p else f"{family}:{p}" for p in parts]


def status_cmd(
    ctx: typer.Context,
    job: Annotated[str | None, typer.Argument(help="Job id; all recent jobs when omitted")] = None,
    wait: Annotated[bool, typer.Option(help="Block until the job ends; exit 0 only if every row succeeded")] = False,
    as_json: JsonOpt = False,
    watch: Annotated[bool, typer.Option(help="Live view of jobs and workers (Ctrl-C to leave)")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between polls")] = 1.0,
) -> None:
    """Progress of a job (or all jobs).

    Example: tokenmill status 3f2a --wait
    """
    settings = settings_from(ctx)
    store = open_store(settings)
    if watch:
        from tokenmill.cli.watch import watch_view

        watch_view(store, settings, job, interval)
        return
    if job is None:
        _jobs_table(store)
        return
    info = _job_status(store, job, wait, interval)
    if info["state"] in UNFINISHED_STATES:
        info["scheduler"] = scheduler_state(store, settings.lost_after)
    if as_json:
        print_plain(json.dumps(info))
    else:
        table = Table(show_header=False, title=f"job {info['job']}")
        for k in ("name", "model", "state", "total", "done", "succeeded", "failed", "cached", "pending",
                  "completion_tokens", "tokens_per_second", "elapsed_s"):  # fmt: skip
            table.add_row(k, str(info[k]))
        if info.get("deadline_note"):
            table.add_row("deadline", str(info["deadline_note"]))
        if info.get("scheduler"):
            table.add_row("scheduler", str(info["scheduler"]))
        out.print(table)
    if wait and info["state"] != JobState.COMPLETED:
        raise JobIncomplete(f"job {info['job']} ended {info['state']} ({info['failed']} failed rows)")


def _job_status(store: Store, job: str, wait: bool, interval: float) -> dict[str, Any]:
    """A job's progress with its model and name; with ``wait``, polled until the job has ended."""
    while True:
        with store.session() as s:
            j = store_jobs.get_job(s, job)
            info = store_jobs.progress(s, j).to_json()
            info["model"] = j.pinned_variant or j.family
            info["name"] = j.name
            if j.options.get("deadline"):
                info["deadline"] = j.options["deadline"]
                info["eta"] = _eta(info)
                info["deadline_note"] = deadline_note(j.options, info["eta"])
        if not wait or info["state"] not in UNFINISHED_STATES:
            return info
        time.sleep(interval)


def _eta(info: dict[str, Any]) -> float | None:
    """When the job will be done at the rate its finished rows were answered (None before the first)."""
    if info["state"] not in ("queued", "running") or not info["done"] or not info["elapsed_s"]:
        return None
    return time.time() + info["pending"] * info["elapsed_s"] / info["done"]


def jobs_cmd(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable, as `status JOB --json`")] = False,
) -> None:
    """List recent jobs, newest first.

    Example: tokenmill jobs --json
    """
    store = open_store(settings_from(ctx))
    if as_json:
        with store.session() as s:
            listed = [{**store_jobs.progress(s, j).to_json(), "model": j.pinned_variant or j.family, "name": j.name}
                      for j in store_jobs.list_jobs(s)]  # fmt: skip
            print_plain(json.dumps(listed))
        return
    _jobs_table(store)


def results_cmd(
    ctx: typer.Context,
    job: JobArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Results JSONL")] = Path("results.jsonl"),
    errors: FailedRowsOpt = None,
) -> None:
    """Export a job's results in input order (OpenAI batch output format).

    Example: tokenmill results 3f2a -o out.jsonl --errors err.jsonl
    """
    store = open_store(settings_from(ctx))
    with store.session() as s:
        job_id = store_jobs.get_job(s, job).id
    ok, bad = export(store, job_id, output, errors)
    console.print(f"{ok} results → {output}" + (f", {bad} failures → {errors}" if errors else f", {bad} failed"))


def cancel_cmd(ctx: typer.Context, job: JobArg) -> None:
    """Stop a job: nothing more is dispatched; running chunks stop at the next row.

    Example: tokenmill cancel 3f2a
    """
    store = open_store(settings_from(ctx))
    with store.session() as s:
        j = store_jobs.get_job(s, job)
        changed = store_jobs.cancel_job(s, j)
        console.print(f"job {j.id} cancelled" if changed else f"job {j.id} already {j.state}")


def retry_cmd(ctx: typer.Context, job: JobArg) -> None:
    """Run a finished job's failed (or cancelled) rows again; the others are kept.

    Example: tokenmill retry 3f2a
    """
    store = open_store(settings_from(ctx))
    with store.session() as s:
        j = store_jobs.get_job(s, job)
        n = store_jobs.retry_failed(s, j)
        console.print(f"job {j.id}: {n} failed rows queued again (state {j.state})")


def register(app: typer.Typer) -> None:
    app.command("submit")(submit_cmd)
    app.command("status")(status_cmd)
    app.command("jobs")(jobs_cmd)
    app.command("results")(results_cmd)
    app.command("cancel")(cancel_cmd)
    app.command("retry")(retry_cmd)


JOB_COLUMNS = (
    Column("id", key=True), Column("state", key=True), Column("model", key=True), Column("rows", drop=4),
    Column("done", drop=5), Column("failed", drop=3), Column("tok/s", drop=2), Column("name", fold=True, drop=1),
)


def _jobs_table(store: Store) -> None:
    rows: list[list[str | Text]] = []
    with store.session() as s:
        for j in store_jobs.list_jobs(s):
            info = store_jobs.progress(s, j).to_json()
            rows.append([
                j.id, j.state, j.pinned_variant or j.family, str(j.total_rows), str(info["done"]),
                str(info["failed"]), f"{info['tokens_per_second']:.1f}", Text(j.name),  # a path, not markup
            ])  # fmt: skip
    print_fitted(out, "jobs", JOB_COLUMNS, rows)

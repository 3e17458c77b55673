"""Fleet commands: worker, scheduler, workers, sysinfo, migrate."""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import Annotated, Any

import typer
from rich.table import Table

from tokenmill.celery_app import make_app
from tokenmill.cli.common import console, open_store, out, print_plain, scheduler_state, settings_from
from tokenmill.cli.options import DEFAULT_MODEL, JsonOpt, NCtxOpt, PreferChoice, PreferOpt, prefer_value
from tokenmill.cli.tables import Column, print_fitted
from tokenmill.scheduler.dispatch import Dispatcher
from tokenmill.store import Store
from tokenmill.store import speeds as store_speeds
from tokenmill.store import workers as store_workers
from tokenmill.store.clock import db_now
from tokenmill.store.states import WorkerState


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def worker_cmd(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", "-m", help="Family, family:variant, or a .gguf path")] = (
        DEFAULT_MODEL
    ),
    concurrency: Annotated[int, typer.Option(help="Worker processes on this host (one per GPU)", min=1)] = 1,
    threads: Annotated[int | None, typer.Option(help="CPU threads per process (default: cores / processes)")] = None,
    gpu: Annotated[bool | None, typer.Option("--gpu/--cpu", help="Force GPU offload on or off")] = None,
    n_seq: Annotated[int | None, typer.Option(help="Sequences decoded together (default 8)")] = None,
    n_ctx: NCtxOpt = 2048,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus metrics on this port")] = None,
    metrics_host: Annotated[
        str, typer.Option(help="Address the metrics port binds (no auth: widen, e.g. 0.0.0.0, deliberately)")
    ] = "127.0.0.1",
    name: Annotated[str | None, typer.Option(help="Name shown in `tokenmill workers`")] = None,
    engine: Annotated[
        str | None, typer.Option(help="Backend: llama, stub (no model) or a plugin's [env: TOKENMILL_ENGINE]")
    ] = None,
    share: Annotated[int, typer.Option(hidden=True, min=1)] = 1,
    prefer: PreferOpt = PreferChoice.balanced,
) -> None:
    """Serve a model family's queue: detects capacity, loads the variant that fits, takes chunks.

    Example: tokenmill worker --model smollm2-135m-instruct --concurrency 2
    """
    settings = settings_from(ctx).with_(engine=engine) if engine else settings_from(ctx)
    from tokenmill.workers.main import WorkerOptions, serve, supervise

    opts = WorkerOptions(
        model=model, threads=threads, gpu=gpu, n_seq=n_seq, n_ctx=n_ctx, name=name,
        metrics_port=metrics_port, metrics_host=metrics_host, share=share, prefer=prefer_value(prefer),
    )  # fmt: skip
    if concurrency > 1:
        raise typer.Exit(supervise(settings, opts, concurrency, use_gpus=gpu, metrics_port=metrics_port))
    logging.getLogger("tokenmill").setLevel(logging.INFO)
    raise typer.Exit(serve(settings, opts))


def scheduler_cmd(
    ctx: typer.Context,
    interval: Annotated[float | None, typer.Option(help="Seconds between dispatch passes")] = None,
) -> None:
    """Run the dispatch loop: enqueue chunks progressively, reopen expired leases, finish jobs.

    Example: TOKENMILL_BROKER_URL=redis://queue:6379/0 tokenmill scheduler
    """
    settings = settings_from(ctx)
    if interval:
        settings = settings.with_(dispatch_interval=interval)
    logging.getLogger("tokenmill").setLevel(logging.INFO)
    store = open_store(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    console.print(f"scheduler: store {store.masked_url}, broker {settings.describe()['broker_url']}")
    try:
        Dispatcher(store, make_app(settings), settings).run(stop)
    except KeyboardInterrupt:
        stop.set()


def workers_cmd(
    ctx: typer.Context,
    as_json: JsonOpt = False,
    all_: Annotated[bool, typer.Option("--all", help="Include stopped workers")] = False,
) -> None:
    """The fleet: host, pid, capacity, variant loaded, load, last heartbeat.

    Example: tokenmill workers
    """
    settings = settings_from(ctx)
    store = open_store(settings)
    rows = _worker_rows(store, settings.lost_after, all_)
    scheduler = scheduler_state(store, settings.lost_after)
    if as_json:
        print_plain(json.dumps(rows))
        return
    print_fitted(out, "workers", WORKER_COLUMNS, _worker_cells(rows))
    for line in _worker_errors(rows):
        out.print(line)
    out.print(f"scheduler: {scheduler}")


def _worker_rows(store: Store, lost_after: float, include_stopped: bool) -> list[dict[str, Any]]:
    """The registered workers as `workers --json` prints them, each in its state as of now (a busy worker
    whose heartbeat is older than ``lost_after`` seconds shows as lost)."""
    rows: list[dict[str, Any]] = []
    with store.session() as s:
        now = db_now(s)  # heartbeats are the store's time, whatever this host's clock says
        measured = store_speeds.decode_rates(s)
        for w in store_workers.list_workers(s):
            state = store_workers.effective_state(w, lost_after, now)
            if state == WorkerState.STOPPED and not include_stopped:
                continue
            cap = w.capacity or {}
            rows.append(
                {
                    "id": w.id, "host": w.host, "pid": w.pid, "state": state, "variant": w.variant,
                    "device": w.device, "threads": w.n_threads, "n_seq": w.n_seq,
                    "cores": cap.get("physical_cores"), "ram_total": cap.get("ram_total_bytes"),
                    "gpus": [g.get("name") for g in cap.get("gpus", [])],
                    "current_job": w.current_job, "current_chunk": w.current_chunk,
                    "rows_done": w.rows_done, "tokens_generated": w.tokens_generated,
                    "heartbeat_age_s": round(now - w.heartbeat_at, 1), "error": w.error,
                    "predicted_tps": (cap.get("predicted") or {}).get("per_sequence_tps"),
                    "measured_tps": round(measured[w.id], 1) if w.id in measured else None,
                }
            )  # fmt: skip
    return rows


WORKER_COLUMNS = (
    Column("host", key=True), Column("pid", key=True), Column("state", key=True), Column("variant", key=True),
    Column("chunk", drop=7), Column("heartbeat", drop=6), Column("rows", drop=5), Column("tokens", drop=3),
    Column("tok/s\npred/meas", drop=4), Column("device", drop=2), Column("capacity", fold=True, drop=1),
)


def _worker_cells(rows: list[dict[str, Any]]) -> list[list[str]]:
    cells = []
    for r in rows:
        cap_text = (f"{r['cores']} cores, " if r["cores"] else "") + (
            _gib(r["ram_total"]) if r["ram_total"] else "") + (f", {', '.join(r['gpus'])}" if r["gpus"] else "")
        cells.append([
            r["host"], str(r["pid"]), r["state"], r["variant"] or "-", str(r["current_chunk"] or "idle"),
            f"{r['heartbeat_age_s']:.0f}s ago", str(r["rows_done"]), str(r["tokens_generated"]), _rates(r),
            r["device"] or "-", cap_text.strip(", ") or "-",
        ])  # fmt: skip
    return cells


def _worker_errors(rows: list[dict[str, Any]]) -> list[str]:
    """A worker's error is a sentence, not a column: one line each under the table, as written."""
    return [f"{r['host']} {r['pid']} {r['state']}: {r['error']}" for r in rows if r["error"]]


def _rates(r: dict[str, Any]) -> str:
    """Predicted and measured decode tok/s per sequence (at the worker's batch width), "-" when unknown."""
    pred = f"{r['predicted_tps']:.0f}" if r.get("predicted_tps") else "-"
    meas = f"{r['measured_tps']:.0f}" if r.get("measured_tps") else "-"
    return f"{pred}/{meas}"


def sysinfo_cmd(as_json: JsonOpt = False) -> None:
    """What a worker would detect and advertise on this machine.

    Example: tokenmill sysinfo --json
    """
    from tokenmill.workers.capacity import detect

    cap = detect(probe_llama=True)  # the build's own answer, GPU or not
    data = cap.to_json()
    if as_json:
        print_plain(json.dumps(data))
        return
    table = Table(show_header=False, title=f"sysinfo: {cap.hostname}")
    table.add_row("cores", f"{cap.physical_cores} physical, {cap.logical_cores} logical")
    table.add_row("memory", f"{_gib(cap.ram_total_bytes)} total, {_gib(cap.ram_available_bytes)} available")
    for g in cap.gpus:
        table.add_row(f"gpu {g.index}", f"{g.name}: {_gib(g.vram_total_bytes)} total, {_gib(g.vram_free_bytes)} free")
    if not cap.gpus:
        table.add_row("gpu", "none detected (NVML)")
    table.add_row("llama.cpp GPU offload", "yes" if cap.gpu_offload else "no (CPU build)")
    out.print(table)


def migrate_cmd(ctx: typer.Context) -> None:
    """Apply the store's Alembic migrations (workers and the scheduler also do it on start).

    Example: TOKENMILL_DATABASE_URL=postgresql://tm@db/tokenmill tokenmill migrate
    """
    store = open_store(settings_from(ctx))
    console.print(f"store {store.masked_url} is at the latest schema")


def register(app: typer.Typer) -> None:
    app.command("worker")(worker_cmd)
    app.command("scheduler")(scheduler_cmd)
    app.command("workers")(workers_cmd)
    app.command("sysinfo")(sysinfo_cmd)
    app.command("migrate")(migrate_cmd)

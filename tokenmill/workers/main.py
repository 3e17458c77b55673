"""Worker entry: detect capacity, choose and load a variant, register, then consume the family's queue.

Decision 4 of DESIGN.md: the model is loaded in the process that serves it, and that process never
forks afterwards (Celery's thread pool, one task at a time). ``--concurrency N`` starts N such
processes, each with its share of the cores.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from tokenmill.celery_app import make_app, queue_for
from tokenmill.config import Settings, mask_text
from tokenmill.errors import ModelError, TokenmillError
from tokenmill.store import Store
from tokenmill.store import workers as store_workers
from tokenmill.workers import runtime as worker_runtime
from tokenmill.workers.engine import Engine
from tokenmill.workers.metrics import WorkerMetrics, start_metrics_server

log = logging.getLogger(__name__)
EXIT_MODEL_FAILED = 4


@dataclass(frozen=True)
class WorkerOptions:
    model: str = "smollm2-135m-instruct"
    concurrency: int = 1
    threads: int | None = None
    n_seq: int | None = None
    n_ctx: int = 2048
    gpu: bool | None = None
    name: str | None = None
    metrics_port: int | None = None
    share: int = 1  # how many tokenmill worker processes split this host


def _engine_factory() -> Any:
    """The real llama.cpp engine, unless TOKENMILL_ENGINE names another (control-plane load tests only)."""
    spec = os.environ.get("TOKENMILL_ENGINE")
    if not spec:
        from tokenmill.workers.llama_engine import LlamaEngine

        return LlamaEngine
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def load_engine(settings: Settings, opts: WorkerOptions, capacity: Any) -> tuple[Engine, str, str, Any]:
    """Resolve, verify and load the best variant that fits; (engine, model_id, family, choice)."""
    from tokenmill.models.catalog import get_family, parse_model_ref
    from tokenmill.models.resolve import looks_like_path, obtainable_predicate, resolve_model
    from tokenmill.models.sizing import choose_variant

    n_seq = opts.n_seq or 8
    choice = None
    if looks_like_path(opts.model):
        resolved = resolve_model(opts.model, settings.models_dir, fetch=False)
    else:
        family_name, quant = parse_model_ref(opts.model)
        if opts.gpu is False:
            capacity = capacity.without_gpus()
        sources = ("local", "registry") if os.environ.get("HF_HUB_OFFLINE") in ("1", "true") else None
        can_get = obtainable_predicate(settings.models_dir, **({"sources": sources} if sources else {}))
        failed: dict[str, str] = {}
        while True:
            try:
                choice = choose_variant(
                    get_family(family_name),
                    capacity,
                    share=opts.share,
                    n_ctx=opts.n_ctx,
                    n_seq=n_seq,
                    pinned=quant,
                    obtainable=lambda v: v.label not in failed and can_get(v),
                )
            except ModelError:
                if not failed:
                    raise
                raise ModelError("; ".join(f"{label}: {why}" for label, why in failed.items())) from None
            try:
                resolved = resolve_model(choice.variant.label, settings.models_dir, fetch=True)
                break
            except ModelError as exc:
                # The best fit may be unreachable (no hub access, corrupt download): take the next best.
                if quant is not None:
                    raise
                failed[choice.variant.label] = str(exc)
                log.warning("cannot obtain %s (%s); trying the next variant", choice.variant.label, exc)
    threads = opts.threads or (choice.n_threads if choice is not None else max(1, (os.cpu_count() or 1) // opts.share))
    gpu_layers = choice.n_gpu_layers if choice is not None else (-1 if opts.gpu else 0)
    factory = _engine_factory()
    engine = factory(
        resolved.path,
        resolved.variant_label,
        n_ctx_per_seq=opts.n_ctx,
        n_seq=n_seq,
        n_threads=threads,
        n_gpu_layers=gpu_layers,
    )
    model_id = resolved.sha256 or resolved.variant_label
    family_queue = resolved.family if choice is not None else f"file-{resolved.family}"
    return engine, model_id, family_queue, choice


def serve(settings: Settings, opts: WorkerOptions) -> int:
    """Run one worker process until it is told to stop; the exit code says how it ended."""
    from tokenmill.workers.capacity import detect

    store = Store(settings.database_url)
    store.retrying(store.migrate)
    capacity = detect()
    host = socket.gethostname()
    worker_id = f"{opts.name or host}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
    family_guess = opts.model.split(":", 1)[0]

    def register(**fields: Any) -> None:
        with store.session() as s:
            store_workers.register(s, id=worker_id, **fields)

    register(
        name=opts.name or host,
        host=host,
        pid=os.getpid(),
        state="starting",
        family=family_guess,
        capacity=capacity.to_json(),
        queues=[],
    )
    try:
        engine, model_id, family, choice = load_engine(settings, opts, capacity)
    except (TokenmillError, OSError, ValueError, RuntimeError) as exc:
        message = mask_text(str(exc))
        log.error("worker %s cannot load %s: %s", worker_id, opts.model, message)
        with store.session() as s:
            store_workers.set_state(s, worker_id, "failed", error=message)
        return EXIT_MODEL_FAILED if isinstance(exc, ModelError | OSError | ValueError) else 1

    quant = engine.variant.split(":", 1)[1] if ":" in engine.variant else None
    queues = [queue_for(family)] + ([queue_for(family, quant)] if quant else [])
    register(
        state="ready",
        family=family,
        variant=engine.variant,
        device=getattr(choice, "device", "cpu") if choice is not None else "cpu",
        choice=getattr(choice, "reason", None),
        n_threads=getattr(engine, "n_threads", 0) or 0,
        n_seq=getattr(engine, "n_seq", 1) or 1,
        queues=queues,
        error=None,
    )
    metrics = WorkerMetrics()
    rt = worker_runtime.WorkerRuntime(
        settings=settings, store=store, engine=engine, worker_id=worker_id, model_id=model_id, metrics=metrics
    )
    worker_runtime.install(rt)
    rt.start()
    if opts.metrics_port:
        metrics.bind_queue_depth(store, worker_id)
        start_metrics_server(opts.metrics_port, metrics)
    app = make_app(settings)
    log.info("worker %s serving %s on %s", worker_id, engine.variant, ", ".join(queues))
    try:
        worker = app.Worker(
            hostname=f"{worker_id.replace(':', '-')}@{host}",
            pool="threads",
            concurrency=1,
            queues=queues,
            loglevel=logging.getLevelName(logging.getLogger().level),
            send_events=True,
            without_mingle=True,
            without_gossip=True,
            optimization="fair",
        )
        worker.start()
        return int(worker.exitcode or 0)
    finally:
        rt.close()
        try:
            with store.session() as s:
                store_workers.set_state(s, worker_id, "stopped")
        except Exception as exc:  # the store may be the reason we are stopping
            log.warning("could not mark worker stopped: %s", mask_text(str(exc)))
        engine.close()


def supervise(argv: list[str], count: int, threads_each: int | None) -> int:
    """Start ``count`` single-process workers and pass signals on; ends when they all have."""
    children: list[subprocess.Popen[bytes]] = []
    for _ in range(count):
        args = [sys.executable, "-m", "tokenmill.cli", "worker", *argv, "--concurrency", "1", "--share", str(count)]
        if threads_each:
            args += ["--threads", str(threads_each)]
        children.append(subprocess.Popen(args))

    def forward(signum: int, _frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = []
    for child in children:
        while True:
            try:
                codes.append(child.wait())
                break
            except KeyboardInterrupt:  # pragma: no cover - forwarded above
                time.sleep(0.1)
    return max(codes, default=0)

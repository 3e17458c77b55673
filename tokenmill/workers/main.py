"""Worker entry: detect capacity, choose and load a variant, register, then consume the family's queue.

One model per worker process (docs/architecture.md, "Decisions worth knowing"): the model is loaded in
the process that serves it, and that process never forks afterwards (Celery's thread pool, one task at a
time). ``--concurrency N`` starts N such processes, each with its share of the cores.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import threading
import time
import uuid
from typing import Any

from celery import signals

from tokenmill.cache import weights_identity
from tokenmill.celery_app import make_app, queue_for
from tokenmill.config import Settings, mask_text
from tokenmill.engine import Engine
from tokenmill.engines import check_backend, load_backend
from tokenmill.errors import ModelError, TokenmillError
from tokenmill.host import Capacity
from tokenmill.models.sizing import Choice
from tokenmill.store import Store
from tokenmill.store import workers as store_workers
from tokenmill.workers import tasks
from tokenmill.workers.diskfull import FullStop
from tokenmill.workers.first_claim import FirstClaim
from tokenmill.workers.local import (
    PARENT_PID_ENV,
    SCHEMA_GATE_ENV,
    SCHEMA_READY_ENV,
    child_env,
    gpu_env,
    worker_argv,
)
from tokenmill.workers.metrics import WorkerMetrics, start_metrics_server
from tokenmill.workers.runtime import WorkerRuntime
from tokenmill.workers.selection import ModelSelection, WorkerOptions, select_model

__all__ = ["WorkerOptions", "load_engine", "pin_chosen_gpu", "serve", "supervise"]

log = logging.getLogger(__name__)
EXIT_MODEL_FAILED = 4


def load_engine(settings: Settings, opts: WorkerOptions, capacity: Capacity) -> tuple[Engine, ModelSelection]:
    """Choose, fetch, verify and load the variant that fits this worker, with the backend ``settings.engine``."""
    sel = select_model(settings, opts, capacity)
    choice = sel.choice
    pin_chosen_gpu(choice, capacity)
    threads = opts.threads or (choice.n_threads if choice is not None else max(1, (os.cpu_count() or 1) // opts.share))
    gpu_layers = choice.n_gpu_layers if choice is not None else (-1 if opts.gpu else 0)
    factory = load_backend(settings.engine)
    engine = factory(
        sel.resolved.path,
        sel.resolved.variant_label,
        n_ctx_per_seq=opts.n_ctx,
        n_seq=sel.n_seq,
        n_threads=threads,
        n_gpu_layers=gpu_layers,
        row_time_limit=settings.row_time_limit,
    )
    return engine, sel


def pin_chosen_gpu(choice: Choice | None, capacity: Capacity) -> None:
    """A worker that sees several GPUs keeps only the one its variant was sized for.

    The choice sizes the model against one GPU's free VRAM, while llama.cpp spreads a model's layers over
    every GPU it sees. Pinning (CUDA_VISIBLE_DEVICES, by UUID) before llama.cpp starts CUDA in this process
    makes the two agree; capacity detection asked llama.cpp about offload in a subprocess, so CUDA has not
    started here yet. A worker that sees one GPU (`worker --concurrency`'s and `run`'s are pinned) is left as is.
    """
    if choice is None or choice.device != "cuda" or len(capacity.usable_gpus) < 2:
        return
    gpu = next((g for g in capacity.usable_gpus if g.index == choice.gpu_index), None)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu.cuda_id
        log.info("pinned to GPU%d %s (%s)", gpu.index, gpu.name, gpu.cuda_id)


def serve(settings: Settings, opts: WorkerOptions) -> int:
    """Run one worker process until it is told to stop; the exit code says how it ended."""
    from tokenmill.workers.capacity import detect

    check_backend(settings.engine)  # a misspelt --engine is one line, before anything is registered
    _exit_with_parent()
    # Every transaction of a worker is a few statements long; one left idle for a lease's length means the
    # worker was cut off mid-transaction, and its locks must not outlive its lease (tests/reliability/
    # test_partition.py).
    store = Store(settings.database_url, idle_in_transaction_timeout=settings.lease_seconds)
    if os.environ.get(SCHEMA_READY_ENV) != "1":  # `run` migrates for its workers
        store.retrying(store.migrate)
    capacity = detect()
    if not schema_gate_opened(settings.lease_seconds):
        log.error("the process that started this worker did not bring the store's schema up; stopping")
        return 1
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
        engine, sel = load_engine(settings, opts, capacity)
    except (TokenmillError, OSError, ValueError, RuntimeError) as exc:
        message = mask_text(str(exc))
        log.error("worker %s cannot load %s: %s", worker_id, opts.model, message)
        with store.session() as s:
            store_workers.set_state(s, worker_id, "failed", error=message)
        return EXIT_MODEL_FAILED if isinstance(exc, ModelError | OSError | ValueError) else 1

    choice, family = sel.choice, sel.family_queue
    model_id = weights_identity(sel.model_id, settings.engine)
    label = sel.resolved.variant_label
    quant = label.split(":", 1)[1] if choice is not None and ":" in label else None
    queues = [queue_for(family, engine=settings.engine)] + (
        [queue_for(family, quant, engine=settings.engine)] if quant else []
    )
    register(
        capacity=_advertised(settings, capacity, sel, engine),
        state="starting",  # loaded; "ready" once Celery consumes (WorkerRuntime.mark_consuming)
        family=family,
        variant=engine.variant,
        device=choice.device if choice is not None else "cpu",
        choice=choice.reason if choice is not None else None,
        n_threads=engine.n_threads,
        n_seq=engine.n_seq,
        queues=queues,
        error=None,
    )
    metrics = WorkerMetrics()
    rt = WorkerRuntime(
        settings=settings, store=store, engine=engine, worker_id=worker_id, model_id=model_id, metrics=metrics
    )
    full = FullStop(store, rt.stop_current)  # a full store disk: stop, exit 6 (workers/diskfull.py)
    rt.start()
    # The first chunk comes straight from the store while Celery boots (workers/first_claim.py).
    first = FirstClaim(rt, store, queues)
    first.start()
    if opts.metrics_port:
        metrics.bind_queue_depth(store, worker_id)
        start_metrics_server(opts.metrics_port, metrics, opts.metrics_host)
    log.info("worker %s serving %s on %s", worker_id, engine.variant, ", ".join(queues))
    try:
        code = _consume(settings, rt, first, full, f"{worker_id.replace(':', '-')}@{host}", queues)
    finally:
        first.stop()
        rt.close()
        try:
            with store.session() as s:
                store_workers.set_state(s, worker_id, "stopped")
        except Exception as exc:  # the store may be the reason we are stopping
            log.warning("could not mark worker stopped: %s", mask_text(str(exc)))
        engine.close()
    return full.exit_code(code)


def _consume(
    settings: Settings, rt: WorkerRuntime, first: FirstClaim, full: FullStop, hostname: str, queues: list[str]
) -> int:
    """Celery's worker on ``queues`` until it is told to stop; its exit code."""

    def ready(**_: Any) -> None:
        full.arm()
        first.consuming()
        rt.mark_consuming()

    def shutting_down(**_: Any) -> None:
        # A warm shutdown (SIGTERM, Ctrl-C, the parent gone) stops the chunk at the next row and reopens it
        # at once; Celery alone would wait for the whole chunk, often past the grace period before SIGKILL.
        first.consuming()
        rt.stop_current("shutdown")

    signals.worker_ready.connect(ready, weak=False)
    signals.worker_shutting_down.connect(shutting_down, weak=False)
    app = make_app(settings)
    # The task reaches this runtime through the app it is registered on, not a global; through
    # ``first``, so it never runs beside the chunk taken from the store.
    tasks.register(app, first)
    worker = app.Worker(
        hostname=hostname,
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


def schema_gate_opened(timeout: float) -> bool:
    """Wait, when the parent asked for it (``SCHEMA_GATE_ENV``), until it says the store's schema is at head.

    False when it closed the gate instead (its start-up failed) or said nothing for ``timeout`` seconds.
    """
    raw = os.environ.get(SCHEMA_GATE_ENV, "")
    if not raw.isdigit():
        return True
    fd = int(raw)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready) and os.read(fd, 1) == b"1"
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def _exit_with_parent() -> None:
    """Stop this worker when the process that started it dies (``TOKENMILL_PARENT_PID``).

    `tokenmill run` starts its local workers in their own process groups (so Ctrl-C reaches `run`, which
    stops them in order) and `worker --concurrency N` supervises its children; if that parent is killed
    (kill -9, OOM killer, a closed terminal), the children would live on as orphans holding a model and
    taking chunks forever, and the next `run` would start a second set beside them. Orphans notice the
    new parent pid within a second and send themselves SIGTERM: a warm shutdown that reopens their chunk.
    """
    raw = os.environ.get(PARENT_PID_ENV, "")
    if not raw.isdigit() or int(raw) != os.getppid():
        return  # not started by a tokenmill parent (or started through a wrapper): nothing to watch

    def watch(parent: int) -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        log.warning("parent process %d is gone; stopping this worker", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, args=(int(raw),), name="tokenmill-parent-watch", daemon=True).start()


def _advertised(settings: Settings, capacity: Capacity, sel: ModelSelection, engine: Engine) -> dict[str, Any]:
    """The capacity a worker registers, with its host probe and the predicted speed of what it loaded, so
    deadline plans can size the fleet and `tokenmill workers` can show predicted beside measured."""
    from dataclasses import asdict

    from tokenmill.models.catalog import get_family
    from tokenmill.models.speed import host_speed, predict, predict_batched

    data: dict[str, Any] = capacity.to_json()
    try:
        speed = host_speed(settings.models_dir)
    except Exception as exc:  # a probe that cannot run must not stop a worker that loaded its model
        log.warning("host speed probe failed: %s", exc)
        return data
    data["speed"] = asdict(speed)
    choice = sel.choice
    if choice is None:
        return data
    family = get_family(choice.variant.family)
    gpu = next((g for g in capacity.usable_gpus if g.index == choice.gpu_index), None)
    gpu = gpu if choice.n_gpu_layers == -1 else None
    single = predict(choice.variant, family, speed=speed, threads=engine.n_threads, gpu=gpu)
    batched = predict_batched(
        choice.variant, family, speed=speed, threads=engine.n_threads, n_seq=engine.n_seq, gpu=gpu
    )
    data["predicted"] = {"gen_tps": round(single.gen_tps, 1), "prompt_tps": round(single.prompt_tps, 1),
                         "batched_tps": round(batched, 1), "per_sequence_tps": round(batched / engine.n_seq, 1)}
    return data


def supervise(
    settings: Settings,
    opts: WorkerOptions,
    count: int,
    *,
    use_gpus: bool | None = None,
    metrics_port: int | None = None,
) -> int:
    """Start ``count`` single-process workers with the options ``argv`` (from local.worker_args) and pass
    signals on; ends when they all have.

    On a GPU host each process is pinned to one GPU (CUDA_VISIBLE_DEVICES by UUID, round-robin), which is
    the "one process per GPU" layout; child ``i`` serves metrics on ``metrics_port + i``. The children get
    ``settings`` in their environment, so global flags (``--database-url``) reach them too.
    """
    from tokenmill.workers.capacity import detect_gpus

    check_backend(settings.engine)
    gpus = detect_gpus() if use_gpus is not False else ()
    children: list[subprocess.Popen[bytes]] = []
    for i in range(count):
        env = child_env(settings, **gpu_env([g.cuda_id for g in gpus], i))
        args = worker_argv(
            model=opts.model, engine=settings.engine, share=count, threads=opts.threads, name=opts.name,
            n_seq=opts.n_seq, n_ctx=opts.n_ctx, gpu=opts.gpu, metrics_port=metrics_port + i if metrics_port else None,
            metrics_host=opts.metrics_host,
            prefer=opts.prefer,
        )  # fmt: skip
        children.append(subprocess.Popen(args, env=env))

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

"""Loading a local worker's model while the rest of the worker is still being imported.

A `tokenmill worker` process spends most of a second importing SQLAlchemy, Celery and the CLI before it
reaches :func:`tokenmill.workers.main.serve`, and then loads its model (llama.cpp reading the weights and
allocating the KV cache: up to a second more) one step after the other. The load is C code that releases
the GIL, so it can run on a thread while the interpreter imports. A parent that starts local workers
(`tokenmill run`'s fleet) knows their options before they start and hands them over in
``TOKENMILL_PRELOAD`` (:func:`preload_env`); ``python -m tokenmill.cli`` calls :func:`start_from_env`
before it imports the CLI, and ``serve`` :func:`take` s the engine, or loads it itself when there is none
(no hand-over, other options, or the preload failed: then the same load runs again and fails or
succeeds the usual way, its error registered like any load error).

One process, one worker, one model: the loaded engine waits in this module until ``serve`` takes it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict
from typing import Any

from tokenmill.config import Settings
from tokenmill.engine import Engine
from tokenmill.engines import load_backend
from tokenmill.host import Capacity
from tokenmill.workers.selection import ModelSelection, WorkerOptions, select_model

log = logging.getLogger(__name__)
PRELOAD_ENV = "TOKENMILL_PRELOAD"


def load_engine(settings: Settings, opts: WorkerOptions, capacity: Capacity) -> tuple[Engine, ModelSelection]:
    """Choose, fetch, verify and load the variant that fits this worker, with the backend ``settings.engine``."""
    sel = select_model(settings, opts, capacity)
    choice = sel.choice
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
    )
    return engine, sel


def preload_env(opts: WorkerOptions) -> dict[str, str]:
    """The environment entry that tells a local worker started with ``opts`` to load its model early."""
    return {PRELOAD_ENV: json.dumps(asdict(opts))}


class _Preload:
    def __init__(self, settings: Settings, opts: WorkerOptions) -> None:
        self.settings = settings
        self.opts = opts
        self.result: tuple[Engine, ModelSelection, Capacity] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._load, name="tokenmill-preload", daemon=True)

    def _load(self) -> None:
        from tokenmill.workers.capacity import detect

        try:
            capacity = detect()
            engine, sel = load_engine(self.settings, self.opts, capacity)
            self.result = (engine, sel, capacity)
        except BaseException as exc:  # serve loads again and reports it the usual way
            self.error = exc


_pending: _Preload | None = None
_lock = threading.Lock()


def start_from_env() -> None:
    """Start loading the model named in ``TOKENMILL_PRELOAD`` on a thread; nothing without it.

    The variable is removed from this process's environment, so nothing this worker starts inherits it.
    """
    global _pending
    raw = os.environ.pop(PRELOAD_ENV, None)
    if not raw:
        return
    try:
        fields: dict[str, Any] = json.loads(raw)
        opts = WorkerOptions(**fields)
        settings = Settings.from_env()
    except (ValueError, TypeError) as exc:  # a hand-over this version cannot read: load the usual way
        log.warning("ignoring %s: %s", PRELOAD_ENV, exc)
        return
    with _lock:
        _pending = _Preload(settings, opts)
        _pending.thread.start()


def take(settings: Settings, opts: WorkerOptions) -> tuple[Engine, ModelSelection, Capacity] | None:
    """The preloaded engine, if one was started for exactly these options and settings and it loaded."""
    global _pending
    with _lock:
        pending, _pending = _pending, None
    if pending is None:
        return None
    pending.thread.join()
    if pending.result is None:
        log.info("preloading the model failed (%s); loading it again", pending.error)
        return None
    same_settings = (pending.settings.engine, pending.settings.models_dir) == (settings.engine, settings.models_dir)
    if pending.opts != opts or not same_settings:
        log.info("the model preloaded for other options is not used; loading again")
        pending.result[0].close()  # loaded for other options: load what serve asks for instead
        return None
    log.info("model %s loaded while the worker started", pending.result[0].variant)
    return pending.result

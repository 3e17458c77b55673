"""A local worker's model loaded on a thread while the worker imports (workers/preload.py), with the real
llama.cpp engine and model: taken by a worker started with the same options, never by another."""

from __future__ import annotations

import os

import pytest

from tokenmill.config import Settings
from tokenmill.workers import preload
from tokenmill.workers.preload import PRELOAD_ENV, preload_env
from tokenmill.workers.selection import WorkerOptions

pytestmark = pytest.mark.model

SMALL = WorkerOptions(model="smollm2-135m-instruct", threads=1, n_seq=1, n_ctx=256, name="local0")


def hand_over(settings: Settings, opts: WorkerOptions, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a worker process sees: its parent's settings and the preload entry in its environment."""
    for name, value in {**settings.as_env(), "HF_HUB_OFFLINE": "1", **preload_env(opts)}.items():
        monkeypatch.setenv(name, value)
    preload.start_from_env()


def test_the_worker_takes_the_model_loaded_for_its_options(
    settings: Settings, smollm2_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    hand_over(settings, SMALL, monkeypatch)
    assert PRELOAD_ENV not in os.environ  # nothing the worker starts inherits it
    loaded = preload.take(settings, SMALL)
    assert loaded is not None
    engine, sel, capacity = loaded
    try:
        assert engine.variant == sel.resolved.variant_label == "smollm2-135m-instruct:q4_1"
        assert (engine.n_seq, engine.n_ctx, engine.n_threads) == (1, 256, 1)
        assert capacity.physical_cores >= 1
        assert preload.take(settings, SMALL) is None  # one engine, taken once
    finally:
        engine.close()


def test_a_model_loaded_for_other_options_is_not_used(
    settings: Settings, smollm2_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    hand_over(settings, SMALL, monkeypatch)
    assert preload.take(settings, WorkerOptions(**{**SMALL.__dict__, "n_ctx": 512})) is None
    assert preload.take(settings, SMALL) is None  # and it is gone: serve loads what it was asked for


def test_no_hand_over_no_preload(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PRELOAD_ENV, raising=False)
    preload.start_from_env()
    assert preload.take(settings, SMALL) is None
    monkeypatch.setenv(PRELOAD_ENV, '{"no_such_option": 1}')  # another version's hand-over: ignored
    preload.start_from_env()
    assert preload.take(settings, SMALL) is None

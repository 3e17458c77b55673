"""`tokenmill worker`: what it tells the store about itself while it starts."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.conftest import STUB_ARGS, WORKER_ENV, Procs, wait_for
from tests.workers.fake_gpu import TWO_GPUS, gpu_host_env
from tokenmill.config import Settings
from tokenmill.host import Capacity, GpuInfo
from tokenmill.models.catalog import get_family
from tokenmill.models.sizing import Choice, MemoryEstimate
from tokenmill.store import Store
from tokenmill.store.tables import Worker
from tokenmill.workers.main import pin_chosen_gpu

GiB = 1024**3


def _worker(store: Store, name: str) -> Worker | None:
    with store.session() as s:
        return s.scalars(select(Worker).where(Worker.name == name)).first()


def _start(procs: Procs, settings: Settings, name: str) -> None:
    args = ("worker", *STUB_ARGS, "--model", "smollm2-135m-instruct", "--threads", "1", "--name", name)
    procs.start(settings, *args, env=WORKER_ENV, name=name)


def test_worker_is_ready_only_once_celery_consumes(settings: Settings, store: Store, procs: Procs) -> None:
    """A loaded model is not yet a worker taking messages: Celery needs its broker first."""
    _start(procs, settings.with_(broker_url="redis://127.0.0.1:1/0"), "no-broker")  # nothing listens there
    wait_for(lambda: (w := _worker(store, "no-broker")) is not None and w.variant is not None, 60, "the load", procs)
    loaded = _worker(store, "no-broker")
    time.sleep(3)  # Celery starts in about a second against a broker it can reach
    w = _worker(store, "no-broker")
    assert loaded is not None and w is not None
    assert w.state == "starting", w.state
    assert w.heartbeat_at > loaded.heartbeat_at  # alive meanwhile: waiting for a broker is not being lost

    _start(procs, settings, "with-broker")  # the embedded SQL broker
    wait_for(lambda: (w := _worker(store, "with-broker")) is not None and w.state == "ready", 60, "ready", procs)


def _workers(store: Store) -> list[Worker]:
    with store.session() as s:
        return list(s.scalars(select(Worker).where(Worker.variant.is_not(None))))


@pytest.mark.timeout(120)
def test_two_gpus_two_workers_each_pinned_to_its_own_and_a_cpu_build_warns(
    settings: Settings, store: Store, procs: Procs, tmp_path: Path
) -> None:
    """`worker --concurrency 2` on a host with two GPUs: one process per GPU, each seeing only its own (pinned
    by UUID). The llama.cpp here is a CPU build, asked for real: each says so and chooses the CPU."""
    env = {**WORKER_ENV, "COLUMNS": "400", **gpu_host_env(tmp_path / "gpu", TWO_GPUS, offload=False)}
    args = ("worker", *STUB_ARGS, "--model", "smollm2-135m-instruct", "--concurrency", "2", "--threads", "1")
    procs.start(settings, *args, "--name", "gpuhost", env=env, name="gpuhost")
    wait_for(lambda: len(_workers(store)) == 2, 90, "two workers loaded", procs)
    workers = _workers(store)
    seen = sorted(tuple(g["uuid"] for g in w.capacity["gpus"]) for w in workers)
    assert seen == sorted((uuid,) for *_, uuid in TWO_GPUS), seen
    for w in workers:
        assert w.capacity["gpu_offload"] is False
        assert w.device == "cpu" and w.choice is not None and "built without GPU offload" in w.choice, w.choice
    logs = " ".join(" ".join(f.read_text(errors="replace").split()) for f in procs.logdir.glob("*.log"))
    assert logs.count("built without GPU offload: running on the CPU") == 2, procs.logs()


def _gpu(index: int, free_gib: float, uuid: str) -> GpuInfo:
    return GpuInfo(index, f"GPU {index}", int(24 * GiB), int(free_gib * GiB), uuid=uuid)


def _choice(device: str, gpu_index: int | None) -> Choice:
    variant = get_family("smollm2-135m-instruct").variant("q4_1")
    memory = MemoryEstimate(variant.size_bytes, 0, 0)
    return Choice(variant, device, -1 if device == "cuda" else 0, 4, memory, "test", 2048, 8, gpu_index)  # type: ignore[arg-type]


def test_a_worker_that_sees_two_gpus_keeps_the_one_it_sized_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp would spread the layers over every GPU it sees; the choice sized them for GPU 1 alone."""
    cap = Capacity("h", 8, 16, 64 * GiB, 60 * GiB, (_gpu(0, 10, "GPU-a"), _gpu(1, 20, "GPU-b")), gpu_offload=True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    pin_chosen_gpu(_choice("cpu", None), cap)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    pin_chosen_gpu(_choice("cuda", 1), cap)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-b"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a")  # pinned by its parent: one GPU seen, left alone
    pin_chosen_gpu(_choice("cuda", 0), replace(cap, gpus=cap.gpus[:1]))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-a"

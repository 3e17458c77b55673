"""Which variant a worker serves, as far as the host's GPUs and its llama.cpp build decide it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tokenmill.config import Settings
from tokenmill.host import Capacity, GpuInfo
from tokenmill.workers.selection import WorkerOptions, select_model

GiB = 1024**3
L4 = GpuInfo(0, "NVIDIA L4", 24 * GiB, 23 * GiB, uuid="GPU-aaaa")


@pytest.mark.model
def test_a_gpu_the_build_cannot_use_is_a_warning_and_the_cpu(
    settings: Settings, smollm2_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cpu_build = Capacity("h", 4, 8, 16 * GiB, 12 * GiB, (L4,), gpu_offload=False)
    with caplog.at_level(logging.WARNING, logger="tokenmill"):
        sel = select_model(settings, WorkerOptions(model="smollm2-135m-instruct:q4_1"), cpu_build)
    assert sel.choice is not None and (sel.choice.device, sel.choice.n_gpu_layers) == ("cpu", 0)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "GPU0 NVIDIA L4 found" in warned[0] and "running on the CPU" in warned[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tokenmill"):
        forced = select_model(settings, WorkerOptions(model="smollm2-135m-instruct:q4_1", gpu=True), cpu_build)
        select_model(settings, WorkerOptions(model="smollm2-135m-instruct:q4_1", gpu=False), cpu_build)
    assert forced.choice is not None and forced.choice.device == "cpu"
    assert len([r for r in caplog.records if "running on the CPU" in r.getMessage()]) == 1  # --cpu: asked for

    gpu_build = Capacity("h", 4, 8, 16 * GiB, 12 * GiB, (L4,), gpu_offload=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tokenmill"):
        on_gpu = select_model(settings, WorkerOptions(model="smollm2-135m-instruct:q4_1"), gpu_build)
    assert on_gpu.choice is not None and (on_gpu.choice.device, on_gpu.choice.n_gpu_layers) == ("cuda", -1)
    assert not caplog.records

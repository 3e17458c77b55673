from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import psutil
import pytest

from tokenmill.host import Capacity, GpuInfo
from tokenmill.workers import capacity as capmod
from tokenmill.workers.capacity import detect, detect_gpus, llama_gpu_offload

GiB = 1024**3


def _llama_has_gpu_backend() -> bool:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return False
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return any(lib.glob("*ggml-cuda*")) or any(lib.glob("*ggml-vulkan*")) or any(lib.glob("*ggml-hip*"))


def test_detect_on_this_machine() -> None:
    cap = detect(probe_llama=True)
    assert 1 <= cap.physical_cores <= cap.logical_cores <= (psutil.cpu_count() or 1)
    assert 0 < cap.ram_available_bytes <= cap.ram_total_bytes
    assert cap.ram_total_bytes > 256 * 1024**2
    assert cap.hostname
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        nvml = True
    except Exception:
        nvml = False
    if not nvml:
        assert cap.gpus == ()
    if not _llama_has_gpu_backend():
        assert cap.gpu_offload is False
    assert Capacity.from_json(json.dumps(cap.to_json())) == cap


def test_the_default_detect_asks_llama_only_when_there_is_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU to offload to: the answer cannot change a choice, so the start-up path skips the probe."""
    asked: list[bool] = []
    gpus: tuple[GpuInfo, ...] = ()

    def probe() -> bool:
        asked.append(True)
        return True

    monkeypatch.setattr(capmod, "detect_gpus", lambda: gpus)
    monkeypatch.setattr(capmod, "llama_gpu_offload", probe)
    assert capmod.detect().gpu_offload is False
    assert asked == []
    assert capmod.detect(probe_llama=True).gpu_offload is True  # sysinfo still asks the build
    gpus = (GpuInfo(0, "NVIDIA L4", 24 * GiB, 23 * GiB),)
    assert capmod.detect().gpu_offload is True
    assert asked == [True, True]


def test_llama_probe_runs_out_of_process() -> None:
    had = "llama_cpp" in sys.modules
    result = llama_gpu_offload()
    assert isinstance(result, bool)
    assert ("llama_cpp" in sys.modules) == had, "the probe must not load llama.cpp into this process"
    if not _llama_has_gpu_backend():
        assert result is False


def test_json_round_trip_and_helpers() -> None:
    cap = Capacity("gpu-host", 8, 16, 64 * GiB, 60 * GiB,
                   (GpuInfo(0, "NVIDIA GeForce RTX 4090", 24 * GiB, 23 * GiB),), gpu_offload=True)
    data = cap.to_json()
    assert data["gpus"][0]["name"] == "NVIDIA GeForce RTX 4090"
    assert Capacity.from_json(data) == cap
    assert Capacity.from_json(json.dumps(data)) == cap
    cpu = cap.without_gpus()
    assert (cpu.gpus, cpu.gpu_offload, cpu.ram_total_bytes) == ((), False, cap.ram_total_bytes)
    assert "GPU0 NVIDIA GeForce RTX 4090 23.0/24.0 GiB free" in cap.describe()
    no_build = Capacity.from_json({**data, "gpu_offload": False})
    assert no_build.usable_gpus == () and "without GPU offload" in no_build.describe()


class _NVMLError(Exception):
    pass


def fake_pynvml(devices: list[tuple[str, int, int, str]] | None, calls: list[str]) -> types.ModuleType:
    """A pynvml stand-in: ``devices`` is (name, total, free, uuid); None means no driver."""
    mod = types.ModuleType("pynvml")

    def init() -> None:
        calls.append("init")
        if devices is None:
            raise _NVMLError("NVML Shared Library Not Found")

    def memory(handle: int) -> Any:
        _, total, free, _ = devices[handle]  # type: ignore[index]
        return types.SimpleNamespace(total=total, free=free, used=total - free)

    mod.NVMLError = _NVMLError  # type: ignore[attr-defined]
    mod.nvmlInit = init  # type: ignore[attr-defined]
    mod.nvmlShutdown = lambda: calls.append("shutdown")  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: len(devices or [])  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    mod.nvmlDeviceGetName = lambda h: devices[h][0].encode()  # type: ignore[attr-defined,index]
    mod.nvmlDeviceGetUUID = lambda h: devices[h][3]  # type: ignore[attr-defined,index]
    mod.nvmlDeviceGetMemoryInfo = memory  # type: ignore[attr-defined]
    return mod


def test_gpus_from_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    devices = [("NVIDIA A100-SXM4-80GB", 80 * GiB, 79 * GiB, "GPU-aaaa"),
               ("NVIDIA GeForce RTX 3070", 8 * GiB, 7 * GiB, "GPU-bbbb")]
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(devices, calls))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpus = detect_gpus()
    assert [g.name for g in gpus] == ["NVIDIA A100-SXM4-80GB", "NVIDIA GeForce RTX 3070"]
    assert gpus[1] == GpuInfo(1, "NVIDIA GeForce RTX 3070", 8 * GiB, 7 * GiB, uuid="GPU-bbbb")
    assert calls == ["init", "shutdown"]

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [g.index for g in detect_gpus()] == [1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa")
    assert [g.index for g in detect_gpus()] == [0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_gpus() == ()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bb, 0")  # a UUID prefix, as CUDA takes it, and an index
    assert [g.index for g in detect_gpus()] == [0, 1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert detect_gpus() == ()


def test_processes_are_pinned_by_uuid_which_cuda_and_nvml_agree_on() -> None:
    """CUDA numbers devices fastest first, NVML by PCI bus: only the UUID names the same card to both."""
    assert GpuInfo(1, "NVIDIA L4", 24 * GiB, 23 * GiB, uuid="GPU-bbbb").cuda_id == "GPU-bbbb"
    stored_before_uuids = {"index": 1, "name": "NVIDIA L4", "vram_total_bytes": 1, "vram_free_bytes": 1}
    cap = Capacity.from_json({"hostname": "h", "physical_cores": 1, "logical_cores": 1, "ram_total_bytes": 1,
                              "ram_available_bytes": 1, "gpus": [stored_before_uuids]})
    assert cap.gpus[0].cuda_id == "1"


def test_no_driver_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(None, calls))
    assert detect_gpus() == ()
    assert calls == ["init"]


def test_container_limits_cap_cores_and_memory(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    (tmp_path / "memory.max").write_text(str(2 * GiB))
    (tmp_path / "memory.current").write_text(str(GiB // 2))
    cap = detect(probe_llama=False, cgroup_root=tmp_path)
    assert cap.logical_cores <= 2 and cap.physical_cores <= cap.logical_cores
    assert cap.ram_total_bytes <= 2 * GiB
    assert cap.ram_available_bytes <= GiB + GiB // 2

    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "memory").mkdir()
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(GiB))
    (v1 / "memory" / "memory.usage_in_bytes").write_text("0")
    cap1 = detect(probe_llama=False, cgroup_root=v1)
    assert (cap1.logical_cores, cap1.physical_cores) == (1, 1)
    assert cap1.ram_total_bytes <= GiB

    unlimited = tmp_path / "unlimited"
    unlimited.mkdir()
    (unlimited / "cpu.max").write_text("max 100000")
    (unlimited / "memory.max").write_text("max")
    assert capmod._cgroup_cpu_limit(unlimited) is None
    assert capmod._cgroup_memory(unlimited) is None


@pytest.mark.gpu
def test_nvml_and_the_cuda_build_see_the_gpu(cuda_gpu: GpuInfo) -> None:
    """On a real GPU: NVML's view (with its UUID and clocks), the offload probe's yes, CUDA_VISIBLE_DEVICES."""
    cap = detect()
    assert cap.gpu_offload is True and cap.usable_gpus == cap.gpus
    gpu = cap.gpus[0]
    assert gpu.uuid.startswith("GPU-") and gpu.cuda_id == gpu.uuid
    assert 4 * GiB < gpu.vram_total_bytes and 0 < gpu.vram_free_bytes <= gpu.vram_total_bytes
    assert gpu.mem_bandwidth_bytes > 100 * 10**9, "NVML's memory clock and bus width were not read"
    count = "from tokenmill.workers.capacity import detect_gpus; print(len(detect_gpus()))"
    for visible, expected in (("", "0"), (gpu.uuid, "1"), (gpu.uuid[:12], "1")):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible}
        out = subprocess.run([sys.executable, "-c", count], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected, (visible, out.stdout, out.stderr)

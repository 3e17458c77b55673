"""What this host can give a worker: cores, RAM, GPUs and whether llama.cpp can offload to them.

Detection must be safe in a parent process that later forks (docs/architecture.md, "Decisions worth knowing": one
model per worker process): NVML reads memory without creating a CUDA context, and llama.cpp is only asked about GPU
offload in a short-lived subprocess unless this process has already loaded it. Container limits (cgroup CPU quota and
memory limit) cap what psutil reports for the whole machine, since a pod sized for 4 GB on a 256 GB node must not pick
a 14B model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from tokenmill.host import Capacity, GpuInfo

log = logging.getLogger(__name__)

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_NO_LIMIT = 1 << 60


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_cpu_limit(root: Path) -> float | None:
    """CPUs allowed by a cgroup quota (v2 ``cpu.max`` or v1 ``cfs_quota_us``), None when unlimited."""
    v2 = _read(root / "cpu.max")
    if v2:
        quota, _, period = v2.partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        return None
    quota_s = _read(root / "cpu" / "cpu.cfs_quota_us")
    period_s = _read(root / "cpu" / "cpu.cfs_period_us")
    if quota_s and period_s and int(quota_s) > 0:
        return int(quota_s) / int(period_s)
    return None


def _cgroup_memory(root: Path) -> tuple[int, int] | None:
    """(limit, current usage) of a cgroup memory limit, None when unlimited."""
    for limit_name, usage_name in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        limit_s = _read(root / limit_name)
        if limit_s is None:
            continue
        if limit_s == "max" or int(limit_s) >= _NO_LIMIT:
            return None
        usage_s = _read(root / usage_name)
        return int(limit_s), int(usage_s) if usage_s else 0
    return None


def _visible_filter() -> set[str] | None:
    """The CUDA_VISIBLE_DEVICES entries (indices or UUIDs), None when unset (all visible)."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    return {item.strip() for item in raw.split(",") if item.strip()}


def _listed(visible: set[str], index: int, uuid: str) -> bool:
    return str(index) in visible or any(uuid.startswith(v) for v in visible if v.startswith("GPU"))


def _nvml_bandwidth(pynvml: Any, handle: Any) -> int:
    """Peak VRAM bytes/s from the memory clock (MHz, double data rate) and the bus width; 0 when unknown."""
    try:
        clock_mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        bus_bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
    except (pynvml.NVMLError, AttributeError):
        return 0
    return int(clock_mhz) * 1_000_000 * 2 * int(bus_bits) // 8


def detect_gpus() -> tuple[GpuInfo, ...]:
    """GPUs with their free VRAM from NVML; no driver (NVMLError) means no GPUs.

    NVML does not create a CUDA context, so this is safe before forking. CUDA_VISIBLE_DEVICES is
    honoured when it lists GPU UUIDs (what tokenmill pins its own workers by, :attr:`GpuInfo.cuda_id`) or
    indices, which are read as NVML's: right under ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` or on a host of like GPUs.
    """
    try:
        import pynvml
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        log.debug("NVML unavailable (%s): no GPUs", exc)
        return ()
    visible = _visible_filter()
    gpus: list[GpuInfo] = []
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
            if visible is not None and not _listed(visible, index, uuid):
                continue
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                GpuInfo(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    vram_total_bytes=int(mem.total),
                    vram_free_bytes=int(mem.free),
                    mem_bandwidth_bytes=_nvml_bandwidth(pynvml, handle),
                    uuid=uuid,
                )
            )
    except pynvml.NVMLError as exc:
        log.warning("NVML failed while listing GPUs (%s); treating this host as having no GPUs", exc)
        return ()
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
    return tuple(gpus)


_PROBE = "import llama_cpp, sys; sys.stdout.write('1' if llama_cpp.llama_supports_gpu_offload() else '0')"


def llama_gpu_offload(timeout: float = 120.0) -> bool:
    """Whether the installed llama.cpp build can offload layers to a GPU.

    Loading llama.cpp's CUDA backend may initialise the driver, so unless this process already
    imported llama_cpp the question is asked in a throwaway interpreter.
    """
    module = sys.modules.get("llama_cpp")
    if module is not None:
        try:
            return bool(module.llama_supports_gpu_offload())
        except Exception:  # an incompatible or half-loaded binding is "no offload", never a crash
            return False
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("could not probe llama.cpp for GPU offload (%s); assuming CPU only", exc)
        return False
    if out.returncode != 0:
        log.warning("llama_cpp failed to import (%s); assuming CPU only", out.stderr.strip()[-300:])
        return False
    return out.stdout.strip().endswith("1")


def usable_gpus() -> tuple[GpuInfo, ...]:
    """The GPUs this host's llama.cpp can use: NVML's, if the build offloads (asked only when NVML finds one)."""
    gpus = detect_gpus()
    return gpus if gpus and llama_gpu_offload() else ()


def detect(*, probe_llama: bool | None = None, cgroup_root: Path = _CGROUP_ROOT) -> Capacity:
    """Measure this host now.

    ``probe_llama``: ask llama.cpp whether it can offload (True), never ask (False, reports no offload), or
    ask only when NVML found a GPU (None, the default). The answer is a subprocess importing llama.cpp
    (half a second, on the start-up path of every worker and `run`), and without a GPU it cannot change
    any choice (:attr:`Capacity.usable_gpus` is empty either way); `sysinfo`, which shows the build's
    answer, passes True.
    """
    import psutil

    logical_total = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical_total = psutil.cpu_count(logical=False) or logical_total
    try:
        logical = len(os.sched_getaffinity(0))
    except AttributeError:
        logical = logical_total
    quota = _cgroup_cpu_limit(cgroup_root)
    if quota is not None:
        logical = min(logical, max(1, math.ceil(quota)))
    physical = max(1, min(physical_total, round(physical_total * logical / logical_total)))

    vm = psutil.virtual_memory()
    ram_total, ram_available = int(vm.total), int(vm.available)
    limit = _cgroup_memory(cgroup_root)
    if limit is not None:
        limit_bytes, usage = limit
        ram_total = min(ram_total, limit_bytes)
        ram_available = max(0, min(ram_available, limit_bytes - usage))

    gpus = detect_gpus()
    offload = llama_gpu_offload() if (probe_llama if probe_llama is not None else bool(gpus)) else False
    return Capacity(
        hostname=socket.gethostname(),
        physical_cores=physical,
        logical_cores=logical,
        ram_total_bytes=ram_total,
        ram_available_bytes=ram_available,
        gpus=gpus,
        gpu_offload=offload,
    )

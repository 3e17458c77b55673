"""Detected host capacity as a value: what a worker advertises and what variant choice sizes against.

Bottom layer: detection lives in :mod:`tokenmill.workers.capacity`, sizing in :mod:`tokenmill.models.sizing`;
both use these types, so they sit below both.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

GiB = 1024**3


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML sees it. ``index`` is the NVML (PCI bus order) index."""

    index: int
    name: str
    vram_total_bytes: int
    vram_free_bytes: int
    mem_bandwidth_bytes: int = 0  # peak bytes/s from NVML's memory clock x bus width; 0 = unknown
    uuid: str = ""  # "GPU-…"; empty in capacities stored before it was recorded

    @property
    def cuda_id(self) -> str:
        """How ``CUDA_VISIBLE_DEVICES`` names this GPU to pin a process to it.

        The UUID, because CUDA numbers devices fastest first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, so on a
        host with unlike GPUs CUDA's device 1 need not be NVML's index 1; the UUID means the same card to both.
        """
        return self.uuid or str(self.index)


@dataclass(frozen=True)
class Capacity:
    """A snapshot of a host's resources, as reported to the store by a worker at registration."""

    hostname: str
    physical_cores: int
    logical_cores: int
    ram_total_bytes: int
    ram_available_bytes: int
    gpus: tuple[GpuInfo, ...] = field(default_factory=tuple)
    gpu_offload: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "gpus", tuple(self.gpus))

    @property
    def usable_gpus(self) -> tuple[GpuInfo, ...]:
        """GPUs llama.cpp can actually use: none when this llama.cpp build has no GPU backend."""
        return self.gpus if self.gpu_offload else ()

    def without_gpus(self) -> Capacity:
        """The same host as a CPU-only worker sees it (``tokenmill worker --no-gpu``)."""
        return replace(self, gpus=(), gpu_offload=False)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["gpus"] = [asdict(g) for g in self.gpus]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> Capacity:
        raw: Mapping[str, Any] = json.loads(data) if isinstance(data, str) else data
        gpus = tuple(GpuInfo(**g) for g in raw.get("gpus", ()))
        return cls(
            hostname=str(raw["hostname"]),
            physical_cores=int(raw["physical_cores"]),
            logical_cores=int(raw["logical_cores"]),
            ram_total_bytes=int(raw["ram_total_bytes"]),
            ram_available_bytes=int(raw["ram_available_bytes"]),
            gpus=gpus,
            gpu_offload=bool(raw.get("gpu_offload", False)),
        )

    def describe(self) -> str:
        """One line for logs and ``tokenmill workers``."""
        parts = [
            f"{self.hostname}: {self.physical_cores} cores ({self.logical_cores} threads)",
            f"{self.ram_available_bytes / GiB:.1f}/{self.ram_total_bytes / GiB:.1f} GiB RAM free",
        ]
        for g in self.gpus:
            parts.append(f"GPU{g.index} {g.name} {g.vram_free_bytes / GiB:.1f}/{g.vram_total_bytes / GiB:.1f} GiB free")
        if self.gpus and not self.gpu_offload:
            parts.append("llama.cpp built without GPU offload")
        return ", ".join(parts)

"""Predicted tokens per second for a variant on a device, from a short probe of the host.

Generating one token reads every weight once, so on a CPU (and on any GPU) decoding is bound by memory
bandwidth: ``tok/s ≈ bandwidth / weight bytes``. Very small models fit in the CPU's caches and are bound
by arithmetic instead, so the CPU rate is the roofline combination of both bounds
(``1 / (bytes / bandwidth + flops / compute)``). Prompt processing is batched and compute-bound.
Each bound is scaled by an efficiency factor measured with the real model on the development machines
(``benchmarks/predict_speed.py`` prints predicted against measured for every local variant).

The probe takes well under a second (a 64 MiB copy, and vectorised multiply-adds over an array that
stays in the L2 cache; best of a few runs) and is cached per host in the models folder, so a worker pays
it once. It uses numpy's own loops, not BLAS, so it measures the core rather than whichever BLAS
(and OpenBLAS core type) is installed.
"""

from __future__ import annotations

import json
import logging
import platform
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenmill.host import GpuInfo
from tokenmill.models.catalog import Family, Variant

log = logging.getLogger(__name__)

PROBE_BYTES = 64 * 1024**2
PROBE_CACHE_FLOATS = 32 * 1024  # 128 KiB of float32: stays in L2, so the loop measures arithmetic
PROBE_CACHE_REPEATS = 200
PROBE_VERSION = 2

# Efficiency factors: measured tok/s divided by the bound computed from the probe. Calibrated on
# SmolLM2-135M Q4_1 with llama-cpp-python 0.3.36 on the 2-core development hosts (see module doc).
CPU_GEN_EFFICIENCY = 0.82
CPU_PROMPT_EFFICIENCY = 1.2
# llama.cpp's quantized dot products (fused multiply-adds over int8 blocks) do about this many times the
# arithmetic per second of numpy's two-pass float32 loop the probe times.
CPU_KERNEL_SPEEDUP = 8.0
GPU_GEN_EFFICIENCY = 0.7  # typical share of peak VRAM bandwidth llama.cpp's CUDA decode reaches
GPU_PROMPT_FLOPS_PER_BYTE = 40.0  # prompt throughput relative to decode on a GPU (batched, compute-bound)

# Arithmetic per weight on a CPU relative to Q8_0: dequantizing a block costs more for some types than the
# bytes it saves. Measured from prompt-processing throughput (pure compute) of SmolLM2 variants here
# (benchmarks/predict_speed.py --quantize: Q8_0 677, Q4_K_M 542, Q4_1 264 tok/s); the others are set to the
# K-quants' figure until measured.
QUANT_COMPUTE_COST: dict[str, float] = {"q8_0": 1.0, "q4_k_m": 1.25, "q4_1": 2.56, "f16": 1.25, "bf16": 1.25}
DEFAULT_COMPUTE_COST = 1.25


def compute_cost(quant: str) -> float:
    """Relative arithmetic per weight of a quant type (a requantized ``q4_k_m_from_q4_1`` is a q4_k_m file)."""
    return QUANT_COMPUTE_COST.get(quant.split("_from_", 1)[0], DEFAULT_COMPUTE_COST)


# Peak memory bandwidth (GB/s) of cards NVML cannot describe (no clock or bus width reported).
KNOWN_GPU_BANDWIDTH_GBS: dict[str, float] = {
    "h200": 4800, "h100": 3350, "a100": 2039, "l40s": 864, "l4": 300, "a10": 600, "t4": 320,
    "rtx 4090": 1008, "rtx 4080": 717, "rtx 3090": 936, "rtx 3080": 760, "rtx 3060": 360, "v100": 900,
}


@dataclass(frozen=True)
class HostSpeed:
    """What the probe measured: bytes/s one core streams through memory, float32 FLOP/s of one core."""

    hostname: str
    cpu: str
    mem_bandwidth_bytes: float
    flops: float
    threads: int = 1
    version: int = PROBE_VERSION

    def describe(self) -> str:
        return (f"{self.mem_bandwidth_bytes / 1e9:.1f} GB/s memory, {self.flops / 1e9:.1f} GFLOP/s "
                f"per core ({self.cpu or 'unknown CPU'})")


@dataclass(frozen=True)
class Prediction:
    prompt_tps: float
    gen_tps: float
    device: str
    basis: str

    def describe(self) -> str:
        return f"~{self.gen_tps:.0f} gen tok/s, ~{self.prompt_tps:.0f} prompt tok/s ({self.basis})"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _best_of(fn: object, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)


def run_probe(threads: int = 1) -> HostSpeed:
    """Measure this host now (a few hundred milliseconds)."""
    import numpy as np

    src = np.ones(PROBE_BYTES // 8, dtype=np.float64)
    dst = np.empty_like(src)
    copy_s = _best_of(lambda: np.copyto(dst, src), 5)
    a = np.full(PROBE_CACHE_FLOATS, 1.0001, dtype=np.float32)
    b = np.full(PROBE_CACHE_FLOATS, 0.9999, dtype=np.float32)
    c = np.zeros_like(a)

    def fma_loop() -> None:
        for _ in range(PROBE_CACHE_REPEATS):
            np.multiply(a, b, out=c)
            np.add(c, a, out=c)

    fma_s = _best_of(fma_loop, 3)
    return HostSpeed(
        hostname=socket.gethostname(),
        cpu=_cpu_name(),
        mem_bandwidth_bytes=2 * PROBE_BYTES / copy_s,  # read + write
        flops=2 * PROBE_CACHE_FLOATS * PROBE_CACHE_REPEATS / fma_s,
        threads=threads,
    )


def host_speed(cache_dir: Path | None = None, *, refresh: bool = False) -> HostSpeed:
    """The cached probe for this host (CPU model + hostname), measured on first use."""
    path = cache_dir / "host-speed.json" if cache_dir is not None else None
    key = f"{socket.gethostname()}|{_cpu_name()}|v{PROBE_VERSION}"
    cached: dict[str, dict[str, object]] = {}
    if path is not None and path.is_file() and not refresh:
        try:
            cached = json.loads(path.read_text())
            if key in cached:
                return HostSpeed(**cached[key])  # type: ignore[arg-type]
        except (OSError, ValueError, TypeError) as exc:
            log.debug("host speed cache %s unreadable: %s", path, exc)
            cached = {}
    speed = run_probe()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            cached[key] = asdict(speed)
            path.write_text(json.dumps(cached, indent=1))
        except OSError as exc:
            log.debug("cannot cache host speed in %s: %s", path, exc)
    return speed


def gpu_bandwidth(gpu: GpuInfo) -> float:
    """Peak VRAM bytes/s: NVML's memory clock and bus width when known, else the card's published figure."""
    if gpu.mem_bandwidth_bytes > 0:
        return float(gpu.mem_bandwidth_bytes)
    name = gpu.name.lower()
    for card, gbs in sorted(KNOWN_GPU_BANDWIDTH_GBS.items(), key=lambda kv: -len(kv[0])):
        if card in name:
            return gbs * 1e9
    return 300e9  # an unknown card: assume an entry-level one rather than promise speed


def _step_costs(
    variant: Variant, family: Family, speed: HostSpeed, threads: int, gpu: GpuInfo | None
) -> tuple[float, float, str]:
    """(seconds to stream the weights once, seconds of arithmetic per token, basis) for one decode step."""
    weight_bytes = float(variant.size_bytes)
    flops_per_token = 2.0 * family.params_b * 1e9
    if gpu is not None:
        bw = gpu_bandwidth(gpu)
        return weight_bytes / bw, flops_per_token / (bw * GPU_PROMPT_FLOPS_PER_BYTE * 2.0), f"{bw / 1e9:.0f} GB/s VRAM"
    threads = max(1, threads)
    # Memory bandwidth scales far less than compute with cores; one more core adds a third.
    bw = speed.mem_bandwidth_bytes * (1 + (threads - 1) / 3)
    compute = speed.flops * threads * CPU_KERNEL_SPEEDUP
    basis = f"{bw / 1e9:.1f} GB/s, {compute / 1e9:.0f} GFLOP/s, {threads} threads"
    return weight_bytes / bw, flops_per_token * compute_cost(variant.quant) / compute, basis


def predict(
    variant: Variant, family: Family, *, speed: HostSpeed, threads: int = 1, gpu: GpuInfo | None = None
) -> Prediction:
    """Prompt and single-sequence generation tok/s of ``variant`` on the CPU (``threads``) or fully on ``gpu``."""
    t_mem, t_flop, basis = _step_costs(variant, family, speed, threads, gpu)
    if gpu is not None:
        gen = GPU_GEN_EFFICIENCY / t_mem
        return Prediction(gen * GPU_PROMPT_FLOPS_PER_BYTE, gen, "cuda", basis)
    gen = CPU_GEN_EFFICIENCY / (t_mem + t_flop)
    return Prediction(CPU_PROMPT_EFFICIENCY / t_flop, gen, "cpu", basis)


def predict_batched(
    variant: Variant, family: Family, *, speed: HostSpeed, threads: int = 1, n_seq: int = 1,
    gpu: GpuInfo | None = None,
) -> float:
    """Generated tok/s summed over ``n_seq`` sequences decoded together (the worker's batch).

    One step streams the weights once for all sequences and does each sequence's arithmetic, so a
    bandwidth-bound model gains almost ``n_seq`` times and a compute-bound one little (roofline).
    """
    t_mem, t_flop, _ = _step_costs(variant, family, speed, threads, gpu)
    eff = GPU_GEN_EFFICIENCY if gpu is not None else CPU_GEN_EFFICIENCY
    n = max(1, n_seq)
    return eff * n / (t_mem + n * t_flop)

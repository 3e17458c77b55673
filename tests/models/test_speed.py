"""The host probe and the per-variant speed predictions built on it."""

from __future__ import annotations

import json
from pathlib import Path

from tokenmill.host import GpuInfo
from tokenmill.models.catalog import get_family
from tokenmill.models.speed import HostSpeed, gpu_bandwidth, host_speed, predict, run_probe

GiB = 1024**3
SPEED = HostSpeed("h", "test cpu", mem_bandwidth_bytes=10e9, flops=8e9)


def test_the_probe_measures_plausible_figures() -> None:
    s = run_probe()
    assert 0.5e9 < s.mem_bandwidth_bytes < 1e12
    assert 0.1e9 < s.flops < 1e13


def test_the_probe_is_cached_per_host(tmp_path: Path) -> None:
    first = host_speed(tmp_path)
    data = json.loads((tmp_path / "host-speed.json").read_text())
    [key] = data
    data[key]["mem_bandwidth_bytes"] = 1234.0  # a cached figure is used as it is, not measured again
    (tmp_path / "host-speed.json").write_text(json.dumps(data))
    assert host_speed(tmp_path).mem_bandwidth_bytes == 1234.0
    assert host_speed(tmp_path, refresh=True).mem_bandwidth_bytes != 1234.0
    assert first.hostname


def test_smaller_variants_are_predicted_faster_on_cpu_and_gpu() -> None:
    fam = get_family("mistral-7b-instruct-v0.3")
    by_size = sorted(fam.variants, key=lambda v: v.size_bytes)
    cpu = [predict(v, fam, speed=SPEED, threads=4).gen_tps for v in by_size]
    gpu = [predict(v, fam, speed=SPEED, gpu=GpuInfo(0, "RTX 4090", 24 * GiB, 24 * GiB)).gen_tps for v in by_size]
    assert cpu == sorted(cpu, reverse=True)
    assert gpu == sorted(gpu, reverse=True)
    assert gpu[0] > 10 * cpu[0]


def test_q8_0_decodes_about_half_as_fast_as_q4_k_m_on_a_big_model_on_cpu() -> None:
    fam = get_family("mistral-7b-instruct-v0.3")
    q8 = predict(fam.variant("q8_0"), fam, speed=SPEED, threads=8).gen_tps
    q4 = predict(fam.variant("q4_k_m"), fam, speed=SPEED, threads=8).gen_tps
    assert 0.45 < q8 / q4 < 0.75


def test_gpu_bandwidth_from_nvml_fields_else_the_cards_figure() -> None:
    assert gpu_bandwidth(GpuInfo(0, "whatever", GiB, GiB, mem_bandwidth_bytes=900_000_000_000)) == 900e9
    assert gpu_bandwidth(GpuInfo(0, "NVIDIA H100 80GB HBM3", GiB, GiB)) == 3350e9
    assert gpu_bandwidth(GpuInfo(0, "NVIDIA GeForce RTX 4090", GiB, GiB)) == 1008e9

"""Which variant each preference picks on the source document's hardware tiers (and a few more)."""

from __future__ import annotations

import pytest

from tokenmill.host import Capacity, GpuInfo
from tokenmill.models.catalog import get_family
from tokenmill.models.sizing import Prefer, choose_variant, order_candidates

GiB = 1024**3


def cpu(ram_gb: int, cores: int = 8) -> Capacity:
    return Capacity("host", cores, 2 * cores, ram_gb * GiB, ram_gb * GiB)


def gpu(vram_gb: int, name: str, ram_gb: int = 64) -> Capacity:
    return Capacity("host", 8, 16, ram_gb * GiB, ram_gb * GiB, (GpuInfo(0, name, vram_gb * GiB, vram_gb * GiB),), True)


TIERS = {
    "8 GB RAM CPU": cpu(8),
    "16 GB RAM CPU": cpu(16),
    "6 GB GPU": gpu(6, "RTX 3060 6GB"),
    "12 GB GPU": gpu(12, "RTX 3060"),
    "24 GB GPU": gpu(24, "RTX 4090"),
    "80 GB GPU": gpu(80, "H100 80GB"),
}

# (tier, family) -> (quality, balanced, speed), each "quant/device/gpu layers" at n_ctx 4096.
EXPECTED = {
    ("8 GB RAM CPU", "mistral-7b-instruct-v0.3"): ("q6_k/cpu/0", "q4_k_m/cpu/0", "q4_k_s/cpu/0"),
    ("16 GB RAM CPU", "mistral-7b-instruct-v0.3"): ("q8_0/cpu/0", "q4_k_m/cpu/0", "q4_k_s/cpu/0"),
    ("16 GB RAM CPU", "qwen2.5-14b-instruct"): ("q6_k/cpu/0", "q4_k_m/cpu/0", "q4_k_s/cpu/0"),
    ("6 GB GPU", "mistral-7b-instruct-v0.3"): ("q4_k_m/cuda/-1", "q4_k_m/cuda/-1", "q4_k_s/cuda/-1"),
    ("6 GB GPU", "qwen2.5-14b-instruct"): ("q5_k_m/cuda/24", "q4_k_m/cuda/28", "q4_k_s/cuda/29"),
    ("12 GB GPU", "mistral-7b-instruct-v0.3"): ("q8_0/cuda/-1", "q5_k_m/cuda/-1", "q4_k_s/cuda/-1"),
    ("12 GB GPU", "qwen2.5-14b-instruct"): ("q5_k_m/cuda/-1", "q5_k_m/cuda/-1", "q4_k_s/cuda/-1"),
    ("24 GB GPU", "qwen2.5-14b-instruct"): ("q8_0/cuda/-1", "q5_k_m/cuda/-1", "q4_k_s/cuda/-1"),
    ("80 GB GPU", "llama-3.1-8b-instruct"): ("bf16/cuda/-1", "q5_k_m/cuda/-1", "q4_k_s/cuda/-1"),
    ("80 GB GPU", "qwen2.5-14b-instruct"): ("q8_0/cuda/-1", "q5_k_m/cuda/-1", "q4_k_s/cuda/-1"),
    ("16 GB RAM CPU", "smollm2-135m-instruct"): ("q8_0/cpu/0", "q4_1/cpu/0", "q4_1/cpu/0"),
}


@pytest.mark.parametrize(("tier", "family"), sorted(EXPECTED))
def test_each_preference_on_each_tier(tier: str, family: str) -> None:
    got = []
    prefs: tuple[Prefer, ...] = ("quality", "balanced", "speed")
    for prefer in prefs:
        c = choose_variant(family, TIERS[tier], n_ctx=4096, prefer=prefer)
        got.append(f"{c.variant.quant}/{c.device}/{c.n_gpu_layers}")
    assert tuple(got) == EXPECTED[(tier, family)]


def test_balanced_takes_q4_k_s_when_q4_k_m_does_not_fit() -> None:
    # 6.3 GiB of RAM less the 1 GiB margin: Q4_K_M with 2 x 4096 tokens of KV (5.4 GiB) does not fit, Q4_K_S (5.2) does.
    tight = Capacity("host", 4, 8, int(6.3 * GiB), int(6.3 * GiB))
    c = choose_variant("mistral-7b-instruct-v0.3", tight, n_ctx=4096, n_seq=2, prefer="balanced")
    assert c.variant.quant == "q4_k_s"
    assert "[prefer balanced]" in c.reason


def test_no_tier_gets_q8_0_on_a_cpu_by_default() -> None:
    for tier in ("8 GB RAM CPU", "16 GB RAM CPU"):
        for family in ("mistral-7b-instruct-v0.3", "llama-3.1-8b-instruct", "qwen2.5-7b-instruct", "gemma-2-9b-it"):
            c = choose_variant(family, TIERS[tier], n_ctx=4096, prefer="balanced")
            assert c.variant.quant in ("q4_k_m", "q4_k_s"), (tier, family, c.variant.quant)


def test_speed_never_goes_below_q3() -> None:
    fam = get_family("mistral-7b-instruct-v0.3")
    ordered = order_candidates(fam.variants, "speed")
    assert all(v.bits_per_weight >= 4.0 for v in ordered)
    assert [v.size_bytes for v in ordered] == sorted(v.size_bytes for v in ordered)


def test_a_pinned_variant_ignores_the_preference() -> None:
    c = choose_variant("mistral-7b-instruct-v0.3", TIERS["16 GB RAM CPU"], n_ctx=4096, pinned="q8_0", prefer="speed")
    assert c.variant.quant == "q8_0"


def test_unknown_preference_is_refused() -> None:
    with pytest.raises(ValueError, match="prefer must be one of"):
        choose_variant("mistral-7b-instruct-v0.3", TIERS["16 GB RAM CPU"], n_ctx=4096, prefer="fast")  # type: ignore[arg-type]

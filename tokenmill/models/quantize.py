"""Variants made on this host with llama.cpp's quantizer, and the local catalog that remembers them.

`tokenmill models quantize NAME TYPE` writes ``<models dir>/<family>/<file>`` through
``llama_model_quantize`` and records it in ``<models dir>/local-catalog.json`` with its sha256, so
variant choice, A/B runs and speed predictions can be exercised with no hub. A variant quantized from a
source that is itself quantized (SmolLM2's Q4_1 wheel) is *requantized*: its quant is named
``<type>_from_<source>`` and it never ranks above its source in quality, whatever its bits say — the
information lost in the first quantization does not come back.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from tokenmill.errors import ModelError, UsageError
from tokenmill.models.catalog import CATALOG, QUANT_BPW, Family, Variant, get_family, normalize_quant
from tokenmill.models.integrity import record_sha256, sha256_file

LOCAL_CATALOG = "local-catalog.json"
UNQUANTIZED = ("f16", "bf16", "f32")

# llama.cpp's llama_ftype values (llama.h) for the types `models quantize` makes.
FTYPES: dict[str, int] = {
    "q4_0": 2, "q4_1": 3, "q8_0": 7, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18,
    "q3_k_s": 11, "q2_k": 10, "f16": 1,
}


def requantized_name(target: str, source: str) -> str:
    return target if source in UNQUANTIZED else f"{target}_from_{source}"


def _catalog_file(models_dir: Path) -> Path:
    return models_dir / LOCAL_CATALOG


def _read_entries(models_dir: Path) -> list[dict[str, Any]]:
    path = _catalog_file(models_dir)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"local catalog {path} is unreadable ({exc}); remove it and quantize again") from None
    return list(data.get("variants", []))


def _write_entries(models_dir: Path, entries: list[dict[str, Any]]) -> None:
    path = _catalog_file(models_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"variants": entries}, indent=1))
    os.replace(tmp, path)


def local_variants(models_dir: Path) -> list[Variant]:
    """Variants made here whose file is still present."""
    out = []
    for e in _read_entries(models_dir):
        v = Variant(family=e["family"], quant=e["quant"], filename=e["filename"], size_bytes=int(e["size_bytes"]),
                    sources=(), sha256=e.get("sha256"), size_exact=True, bits_per_weight=float(e["bits_per_weight"]))
        if (models_dir / v.family / v.filename).is_file():
            out.append(v)
    return out


def catalog_with_local(models_dir: Path, catalog: Mapping[str, Family] | None = None) -> dict[str, Family]:
    """The built-in catalog with this host's own variants added to their families."""
    base = dict(CATALOG if catalog is None else catalog)
    extra: dict[str, list[Variant]] = {}
    for v in local_variants(models_dir):
        if v.family in base and v.quant not in base[v.family].quants:
            extra.setdefault(v.family, []).append(v)
    for name, variants in extra.items():
        base[name] = replace(base[name], variants=base[name].variants + tuple(variants))
    return base


def quantize(
    name: str, target: str, models_dir: Path, *, source_path: Path, source_quant: str, threads: int = 0
) -> Variant:
    """Quantize ``source_path`` (a variant of family ``name``) to ``target`` and register the result."""
    family = get_family(name)
    target = normalize_quant(target)
    if target not in FTYPES:
        raise UsageError(f"cannot quantize to {target!r}; choose one of {', '.join(sorted(FTYPES))}")
    if target == source_quant:
        raise UsageError(f"{family.name}:{source_quant} already is {target}; pick another type or --from variant")
    quant = requantized_name(target, source_quant)
    filename = f"{family.name}.{quant}.gguf"
    out = models_dir / family.name / filename
    out.parent.mkdir(parents=True, exist_ok=True)
    _run_quantizer(source_path, out, FTYPES[target], requantize=source_quant not in UNQUANTIZED, threads=threads)
    sha = sha256_file(out)
    record_sha256(out, sha, models_dir)
    size = out.stat().st_size
    # Measured, not the type's nominal figure: tensors whose rows do not divide into the type's blocks
    # fall back to a wider type (SmolLM2's 576-wide rows do for every K-quant).
    bpw = round(size * 8 / (family.params_b * 1e9), 2) if family.params_b else QUANT_BPW.get(target, 16.0)
    variant = Variant(family=family.name, quant=quant, filename=filename, size_bytes=size,
                      sources=(), sha256=sha, size_exact=True, bits_per_weight=bpw)
    entries = [e for e in _read_entries(models_dir) if not (e["family"] == family.name and e["quant"] == quant)]
    entries.append({"family": family.name, "quant": quant, "filename": filename, "size_bytes": variant.size_bytes,
                    "sha256": sha, "bits_per_weight": variant.bits_per_weight, "quantized_from": source_quant,
                    "requantized": source_quant not in UNQUANTIZED})
    _write_entries(models_dir, entries)
    return variant


def _run_quantizer(src: Path, dst: Path, ftype: int, *, requantize: bool, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.allow_requantize = requantize
    tmp = dst.with_name(f".{dst.name}.part")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ModelError(f"llama.cpp could not quantize {src} (return code {rc})")
    os.replace(tmp, dst)

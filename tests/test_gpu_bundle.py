"""deploy/gpu's helpers, here without a GPU: the trimmed llama.cpp sources, the model cut into loads and joined
again, and the checks run.sh applies to what `sysinfo` and `models recommend` say on the GPU machine."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import tarfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

GPU_DIR = Path(__file__).resolve().parents[1] / "deploy" / "gpu"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"deploy_gpu_{name}", GPU_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bundle, model_parts, check_gpu = load("bundle"), load("model_parts"), load("check_gpu")

LONG = "ggml/src/ggml-cuda/template-instances/" + "fattn-vec-instance-" + "q8_0-" * 12 + "f16.cu"


def fake_sdist(path: Path, files: list[str]) -> Path:
    """A llama-cpp-python sdist holding ``files`` under its vendored llama.cpp, as PAX (names over 100 chars)."""
    prefix = f"llama_cpp_python-{bundle.LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name in [f"llama_cpp_python-{bundle.LLAMA_CPP_PYTHON}/pyproject.toml", *(prefix + f for f in files)]:
            data = name.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_the_trimmed_sources_keep_what_the_build_reads_under_one_folder(tmp_path: Path) -> None:
    kept = ["CMakeLists.txt", "ggml/src/ggml.c", LONG, "tools/server/server.cpp", "tools/ui/CMakeLists.txt",
            "scripts/ui-assets.cmake", "vendor/nlohmann/json.hpp"]
    dropped = ["docs/build.md", "models/ggml-vocab.gguf", "tools/ui/src/app.ts", "tools/server/tests/t.py",
               "scripts/sync_vendor.py", "README.md"]
    assert len(LONG) > 100  # a path tar keeps in a PAX header
    sdist = fake_sdist(tmp_path / "s.tar.gz", kept + dropped)
    out = tmp_path / "src.tar.xz"
    unpacked = bundle.trim_sources(sdist, out)
    with tarfile.open(out) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    found = sorted(str(p.relative_to(tmp_path / "x")) for p in (tmp_path / "x").rglob("*") if p.is_file())
    assert found == sorted(f"llama.cpp/{f}" for f in kept)
    assert unpacked == sum(len(f"llama_cpp_python-{bundle.LLAMA_CPP_PYTHON}/vendor/llama.cpp/{f}") for f in kept)


def test_the_model_cut_into_loads_comes_back_whole(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(bytes(range(256)) * 4)
    parts = bundle.split_model(model, tmp_path / "bundle", 300, 400)
    assert [(p["load"], p["size"]) for p in parts] == [(1, 300), (2, 400), (3, 324)]
    manifest = tmp_path / "manifest.json"
    model_info = {"family": "fam", "filename": "m.gguf", "size": 1024,
                  "sha256": hashlib.sha256(model.read_bytes()).hexdigest()}
    manifest.write_text(json.dumps({"model": model_info, "parts": parts}))
    received, models = tmp_path / "received", tmp_path / "models"
    received.mkdir()
    for p in parts[:2]:  # the last load has not come yet
        (received / p["name"]).write_bytes((tmp_path / "bundle" / f"load{p['load']}" / p["name"]).read_bytes())
    assert model_parts.main(manifest, received, models) == 0
    assert not (models / "fam" / "m.gguf").exists()
    last = parts[2]
    (received / last["name"]).write_bytes(b"x" * last["size"])  # corrupt in transit
    assert model_parts.main(manifest, received, models) == 1
    (received / last["name"]).write_bytes((tmp_path / "bundle" / "load3" / last["name"]).read_bytes())
    assert model_parts.main(manifest, received, models) == 0
    assert (models / "fam" / "m.gguf").read_bytes() == model.read_bytes()


def _sysinfo(offload: bool) -> dict[str, Any]:
    gpu = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "vram_total_bytes": 80 * 2**30,
           "vram_free_bytes": 79 * 2**30, "mem_bandwidth_bytes": 3_350_000_000_000, "uuid": "GPU-1234"}
    return {"gpus": [gpu], "gpu_offload": offload}


def _recommend(device: str, layers: int) -> list[dict[str, Any]]:
    choice = {"variant": "smollm2-135m-instruct:q4_1", "device": device, "n_gpu_layers": layers, "reason": "r"}
    other = {"variant": "mistral-7b-instruct:q4_k_m", "device": "cpu", "n_gpu_layers": 0, "reason": "r"}
    return [{"family": "smollm2-135m-instruct", "choice": choice}, {"family": "mistral-7b", "choice": other}]


@pytest.mark.parametrize(
    ("offload", "device", "layers", "failed"),
    [(True, "cuda", -1, []), (False, "cpu", 0, ["offload probe", "smollm2"]), (True, "cuda", 20, ["smollm2"])],
)
def test_the_gpu_checks_pass_only_on_full_offload(offload: bool, device: str, layers: int, failed: list[str]) -> None:
    results = check_gpu.checks(_sysinfo(offload), _recommend(device, layers))
    bad = [line for ok, line in results if ok is False]
    assert len(bad) == len(failed) and all(word in line for word, line in zip(failed, bad, strict=True)), bad
    assert any(ok is None and "mistral-7b" in line for ok, line in results)  # other families: shown only
    assert check_gpu.checks({"gpus": [], "gpu_offload": False}, [])[0] == (False, "NVML sees 0 GPU(s)")

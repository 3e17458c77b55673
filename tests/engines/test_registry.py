"""Engines as named backends: `--engine NAME` / TOKENMILL_ENGINE pick a factory from tokenmill.engines."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import WORKER_ENV, run_cli
from tokenmill.config import Settings
from tokenmill.engine import Engine, EngineFactory, Generation
from tokenmill.engines import BUILTIN, ENTRY_POINT_GROUP, backend_names, check_backend, load_backend
from tokenmill.engines.stub import StubEngine
from tokenmill.errors import UsageError
from tokenmill.rows import COMPLETIONS, DatasetRow, SamplingParams

# Type-level checks (mypy): every built-in backend is an EngineFactory whose products are Engines.
_STUB: EngineFactory = StubEngine


def test_builtin_names_resolve_to_their_backends() -> None:
    assert backend_names()[:2] == ["llama", "stub"]
    assert load_backend("stub") is StubEngine
    from tokenmill.engines.llama import LlamaEngine

    assert load_backend("llama") is LlamaEngine


@pytest.mark.parametrize("name", ["nope", "", "tests.stub_engine:StubEngine", "LLAMA"])
def test_an_unknown_name_is_a_usage_error_naming_the_choices(name: str) -> None:
    with pytest.raises(UsageError) as err:
        load_backend(name)
    assert str(err.value) == f"unknown engine {name!r}; choose one of: {', '.join(backend_names())}"
    assert err.value.exit_code == 2
    with pytest.raises(UsageError):
        check_backend(name)


def test_the_stub_selected_by_name_generates_deterministic_text(tmp_path: Path) -> None:
    factory = load_backend("stub")
    engine: Engine = factory(tmp_path / "never-read.gguf", "fam:q4", n_ctx_per_seq=64, n_seq=2, n_threads=3)
    assert (engine.variant, engine.n_ctx, engine.n_seq, engine.n_threads) == ("fam:q4+stub", 64, 2, 3)
    two = SamplingParams(max_tokens=2)
    rows = [
        DatasetRow(line=1, custom_id="a", endpoint=COMPLETIONS, prompt="hello there", params=two),
        DatasetRow(line=2, custom_id="b", endpoint=COMPLETIONS, prompt="x" * 65, params=two),
    ]
    done: dict[str, Generation | Exception] = {}
    engine.generate(rows, lambda row, res: done.__setitem__(row.custom_id, res), lambda: False)
    ok = done["a"]
    assert isinstance(ok, Generation) and ok.text == "echo:a" and ok.completion_tokens == 2
    assert type(done["b"]).__name__ == "RequestTooLong"  # longer than its context: that row fails alone
    engine.close()


def test_settings_name_the_backend_and_hand_it_to_children() -> None:
    assert Settings().engine == "llama"
    chosen = Settings.from_env({"TOKENMILL_ENGINE": "stub"})
    assert chosen.engine == "stub" and chosen.as_env()["TOKENMILL_ENGINE"] == "stub"
    assert Settings.from_env(chosen.as_env()).engine == "stub"


def _install_plugin(root: Path, monkeypatch: pytest.MonkeyPatch, entries: str) -> None:
    """A third-party distribution on sys.path declaring ``entries`` in the tokenmill.engines group."""
    dist = root / "tm_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tm-plugin\nVersion: 0.1\n", encoding="utf-8")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entries}\n", encoding="utf-8")
    (root / "tm_plugin_engine.py").write_text(
        "from tokenmill.engines.stub import StubEngine\n\nclass PluginEngine(StubEngine):\n    pass\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delitem(sys.modules, "tm_plugin_engine", raising=False)


def test_a_plugin_backend_is_found_through_its_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_plugin(
        tmp_path,
        monkeypatch,
        "mine = tm_plugin_engine:PluginEngine\nstub = tm_plugin_engine:PluginEngine\nbroken = tm_plugin_missing:X",
    )
    assert backend_names() == [*BUILTIN, "broken", "mine"]
    assert getattr(load_backend("mine"), "__name__", None) == "PluginEngine"
    assert load_backend("stub") is StubEngine  # a plugin cannot take a built-in name over
    with pytest.raises(UsageError, match=r"^engine 'broken' \(tm_plugin_missing:X\) cannot be imported: "):
        load_backend("broken")


def test_worker_with_an_unknown_engine_exits_with_one_clean_line(settings: Settings) -> None:
    for args in (("--engine", "nope"), ("--engine", "nope", "--concurrency", "2")):
        proc = run_cli(settings, "worker", *args, "--name", "bad", env=WORKER_ENV, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "unknown engine 'nope'; choose one of: llama, stub" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_the_environment_names_the_backend_when_no_flag_does(settings: Settings) -> None:
    proc = run_cli(settings, "worker", "--name", "bad", env={**WORKER_ENV, "TOKENMILL_ENGINE": "nope"}, timeout=60)
    assert proc.returncode == 2 and "unknown engine 'nope'" in proc.stderr, proc.stderr

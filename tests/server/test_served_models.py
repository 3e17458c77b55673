"""Serve's model list: what the operator names, else what is on the host; checked against the catalog."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli
from tokenmill.config import Settings
from tokenmill.errors import ConfigError
from tokenmill.models.catalog import CATALOG
from tokenmill.models.resolve import local_path
from tokenmill.server.served_models import local_models, model_problem, parse_list, served_models

SMOL = "smollm2-135m-instruct"


MISTRAL = "mistral-7b-instruct-v0.3"


def test_a_bare_family_allows_every_quant_and_a_quant_allows_only_itself() -> None:
    served = parse_list((SMOL, f"{MISTRAL}:Q8_0"), "test")
    assert served is not None
    assert served.allows(SMOL, None) and served.allows(SMOL, "q8_0")
    assert served.allows(MISTRAL, None) and served.allows(MISTRAL, "q8_0")
    assert not served.allows(MISTRAL, "q4_k_m") and not served.allows("gemma-3-270m", None)
    assert parse_list(("*",), "test") is None  # every catalog model


@pytest.mark.parametrize(("entry", "words"), [("smollm3-9000b", "not a catalog model"), (f"{SMOL}:q9_9", "no q9_9")])
def test_a_typo_in_the_list_is_a_config_error(entry: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_list((entry,), "--models")


def test_by_default_an_embedded_server_serves_what_is_in_its_models_folder(tmp_path: Path) -> None:
    assert local_models(tmp_path / "empty").variants == frozenset()
    embedded = Settings(data_dir=tmp_path / ".tm", models_dir=tmp_path / "models")
    path = local_path(CATALOG[MISTRAL].variant("q4_k_m"), embedded.models_dir)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"GGUF")
    served = served_models(embedded)
    assert served is not None and served.variants == {(MISTRAL, "q4_k_m")}
    assert model_problem(MISTRAL, served) is None and model_problem(f"{MISTRAL}:Q4_K_M", served) is None
    assert "is not served here" in (model_problem(f"{MISTRAL}:q8_0", served) or "")
    assert "is not served here" in (model_problem(SMOL, served) or "")
    fleet = embedded.with_(database_url="postgresql://db/x", broker_url="redis://r/0")
    assert served_models(fleet) is None  # API-only: the fleet's workers decide
    assert served_models(fleet.with_(serve_models=(SMOL,))) == parse_list((SMOL,), "the operator's --models list")


def test_serve_models_setting_is_read_from_the_environment() -> None:
    env = {"TOKENMILL_SERVE_MODELS": f" {SMOL}, gemma-3-270m:q8_0 ,"}
    assert Settings.from_env(env).serve_models == (SMOL, "gemma-3-270m:q8_0")
    assert Settings.from_env({}).serve_models == ()


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ("m" * 10_000, "longer than 200 characters"),
        ("/etc/passwd.gguf", "is not a catalog name"),
        ("no-such-model", "unknown model 'no-such-model'"),
        (f"{SMOL}:" + "q" * 150, "has no 'qqqq"),
    ],
)
def test_model_problems_are_one_bounded_line(model: str, words: str) -> None:
    problem = model_problem(model, None)
    assert problem is not None and words in problem and len(problem) < 400


def test_serve_refuses_to_start_with_a_model_list_naming_no_catalog_model(tmp_path: Path, settings: Settings) -> None:
    proc = run_cli(settings, "serve", "--models", f"{SMOL},smollm3-9000b", "--port", "9", timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'smollm3-9000b' is not a catalog model" in " ".join(proc.stderr.split())

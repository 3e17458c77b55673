"""Everyday CLI use: every command's --help shows an example, usage errors are one clean message, and
`sysinfo --json` / `models recommend --json` describe this machine sanely."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from tests.conftest import run_cli
from tokenmill.cli.app import app
from tokenmill.config import Settings
from tokenmill.models.catalog import CATALOG

runner = CliRunner()


def command_paths(cmd: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        if not getattr(sub, "hidden", False):
            yield from command_paths(sub, (*path, name))


ALL_COMMANDS = list(command_paths(typer.main.get_command(app)))


def test_the_walk_finds_the_whole_tree() -> None:
    names = {" ".join(p) for p in ALL_COMMANDS}
    assert {"", "run", "submit", "status", "jobs", "worker", "scheduler", "sysinfo", "models",
            "models recommend", "models pull"} <= names  # fmt: skip


@pytest.mark.parametrize("path", ALL_COMMANDS, ids=lambda p: " ".join(p) or "tokenmill")
def test_help_has_an_example_of_that_command(path: tuple[str, ...]) -> None:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())
    assert "Example" in text, text
    example = text.split("Example", 1)[1]
    # The example runs this very command (not just any tokenmill command), e.g. "tokenmill models pull ...".
    assert "tokenmill " + " ".join(path) in example, example


def test_usage_errors_are_one_message_not_a_traceback(settings: Settings) -> None:
    for args in (["run", "--bogus", "x.jsonl"], ["submit", "x.jsonl", "--chunk-size", "0"]):
        proc = run_cli(settings, *args, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and "Error:" in proc.stderr


def test_sysinfo_json() -> None:
    result = runner.invoke(app, ["sysinfo", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["hostname"] and 1 <= info["physical_cores"] <= info["logical_cores"]
    assert 0 < info["ram_available_bytes"] <= info["ram_total_bytes"]
    assert isinstance(info["gpus"], list) and isinstance(info["gpu_offload"], bool)
    for gpu in info["gpus"]:
        assert gpu["name"] and 0 <= gpu["vram_free_bytes"] <= gpu["vram_total_bytes"]


def test_models_recommend_json() -> None:
    sysinfo = json.loads(runner.invoke(app, ["sysinfo", "--json"]).stdout)
    result = runner.invoke(app, ["models", "recommend", "--json", "--n-ctx", "2048", "--n-seq", "2", "--share", "2"])
    assert result.exit_code == 0, result.output
    recs = json.loads(result.stdout)
    assert [r["family"] for r in recs] == list(CATALOG)
    smallest = next(r for r in recs if r["family"] == "smollm2-135m-instruct")
    assert smallest["choice"] is not None, smallest["error"]  # a 135M model fits anything that runs tests
    for r in recs:
        if r["choice"] is None:
            assert r["error"]
            continue
        c = r["choice"]
        family, quant = c["variant"].split(":")
        assert family == r["family"] and quant in CATALOG[family].quants
        assert (c["n_ctx"], c["n_seq"]) == (2048, 2)
        mem = c["memory"]
        assert mem["total_bytes"] == mem["weights_bytes"] + mem["kv_bytes"] + mem["overhead_bytes"] > 0
        assert quant in c["reason"]
        if c["device"] == "cpu":
            assert c["n_gpu_layers"] == 0
            assert 1 <= c["n_threads"] <= max(1, sysinfo["physical_cores"] // 2)  # its share of the cores
            assert mem["total_bytes"] <= sysinfo["ram_total_bytes"] / 2

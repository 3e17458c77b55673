"""Choosing the variant for the job from the CLI: recommend with predictions, quantize, --deadline, workers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tokenmill.config import Settings


def test_recommend_picks_a_4_bit_k_quant_for_7b_families_and_predicts_every_candidate(settings: Settings) -> None:
    proc = run_cli(settings, "models", "recommend", "--json")
    assert proc.returncode == 0, proc.stderr
    recs = {r["family"]: r for r in json.loads(proc.stdout)}
    for family in ("mistral-7b-instruct-v0.3", "llama-3.1-8b-instruct", "qwen2.5-7b-instruct"):
        assert recs[family]["choice"]["variant"].split(":")[1] in ("q4_k_m", "q4_k_s"), recs[family]["choice"]
        fitting = [c for c in recs[family]["candidates"] if c["fits"]]
        assert fitting and all(c["gen_tps"] > 0 and c["prompt_tps"] > 0 for c in fitting)
        assert sum(c["chosen"] for c in recs[family]["candidates"]) == 1
    quality = json.loads(run_cli(settings, "models", "recommend", "--json", "--prefer", "quality").stdout)
    assert {r["family"]: r for r in quality}["mistral-7b-instruct-v0.3"]["choice"]["variant"].endswith("q8_0")


@pytest.fixture
def own_models_dir(tmp_path: Path, smollm2_path: Path) -> Path:
    """A models folder of the test's own holding the real Q4_1 file (so quantizing does not touch the cache)."""
    d = tmp_path / "models" / "smollm2-135m-instruct"
    d.mkdir(parents=True)
    os.symlink(smollm2_path, d / smollm2_path.name)
    shutil.copy(str(smollm2_path) + ".sha256", d / (smollm2_path.name + ".sha256"))
    return tmp_path / "models"


@pytest.mark.model
def test_quantize_makes_a_variant_that_run_can_pin_and_workers_report(
    tmp_path: Path, settings: Settings, own_models_dir: Path
) -> None:
    local = settings.with_(models_dir=own_models_dir)
    proc = run_cli(local, "models", "quantize", "smollm2-135m-instruct", "q4_k_m", "--from", "q4_1")
    assert proc.returncode == 0, proc.stderr
    assert "requantized" in proc.stderr and Path(proc.stdout.strip().splitlines()[-1]).is_file()
    listed = run_cli(local, "models", "recommend", "--json", "--prefer", "quality")
    smol = {r["family"]: r for r in json.loads(listed.stdout)}["smollm2-135m-instruct"]
    assert "q4_k_m_from_q4_1" in [c["variant"] for c in smol["candidates"]]

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Count to {i}:", "max_tokens": 8, "temperature": 0}) + "\n"
                            for i in range(6)))
    out = tmp_path / "rows.results.jsonl"
    run = run_cli(local, "run", str(data), "--model", "smollm2-135m-instruct:q4_k_m_from_q4_1", "-o", str(out),
                  "--workers", "1", "--threads", "2")
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 6 and {line["tokenmill"]["model"] for line in lines} == {
        "smollm2-135m-instruct:q4_k_m_from_q4_1"}
    workers = json.loads(run_cli(local, "workers", "--all", "--json").stdout)
    assert workers and all(w["predicted_tps"] and w["measured_tps"] for w in workers), workers


@pytest.mark.model
def test_deadline_prints_a_plan_pins_a_variant_and_status_shows_it(
    tmp_path: Path, settings: Settings, smollm2_path: Path
) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}.", "max_tokens": 6}) + "\n" for i in range(4)))
    proc = run_cli(settings, "submit", str(data), "--model", "smollm2-135m-instruct", "--deadline", "8h")
    assert proc.returncode == 0, proc.stderr
    assert "plan: 4 rows" in proc.stderr and "meets the deadline" in proc.stderr
    job = proc.stdout.strip().splitlines()[-1]
    info = json.loads(run_cli(settings, "status", job, "--json").stdout)
    assert info["model"].startswith("smollm2-135m-instruct:") and info["deadline"] > 0
    assert "deadline" in info["deadline_note"]
    bad = run_cli(settings, "submit", str(data), "--model", "smollm2-135m-instruct", "--deadline", "soon")
    assert bad.returncode == 2 and "--deadline 'soon'" in bad.stderr

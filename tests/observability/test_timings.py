"""Every output line carries per-request timings under Ollama's and llama-server's names, consistent
with the usage counts: people compare tokenmill's numbers with those servers' without a conversion table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_cli
from tokenmill.config import Settings
from tokenmill.engine import Generation
from tokenmill.output import response_body, timings
from tokenmill.rows import COMPLETIONS, DatasetRow

OLLAMA = {"load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count", "eval_duration", "total_duration"}
LLAMA_SERVER = {"prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms", "predicted_per_second"}
NS_PER_MS = 1_000_000


def check_consistent(usage: dict[str, Any], t: dict[str, Any]) -> None:
    """The invariants a reader relies on, whatever produced the generation."""
    o, ls = t["ollama"], t["llama_server"]
    assert o.keys() >= OLLAMA and ls.keys() >= LLAMA_SERVER
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert cached == t["cached_prompt_tokens"] == ls["cache_n"]
    # Both servers count the prompt tokens they evaluated; the reused prefix is reported apart.
    assert o["prompt_eval_count"] == ls["prompt_n"] == usage["prompt_tokens"] - cached
    assert o["eval_count"] == ls["predicted_n"] == usage["completion_tokens"] == len(t["token_ms"])
    # Ollama durations are integer nanoseconds of the same measurements llama-server gives in ms.
    assert abs(o["prompt_eval_duration"] - ls["prompt_ms"] * NS_PER_MS) <= NS_PER_MS / 1000
    assert abs(o["eval_duration"] - ls["predicted_ms"] * NS_PER_MS) <= NS_PER_MS / 1000
    assert abs(o["total_duration"] - t["total_ms"] * NS_PER_MS) <= NS_PER_MS / 1000
    assert abs(o["load_duration"] - t["load_ms"] * NS_PER_MS) <= NS_PER_MS / 1000
    assert o["total_duration"] >= o["prompt_eval_duration"] and o["total_duration"] >= o["eval_duration"]
    if ls["prompt_ms"] > 0:
        assert ls["prompt_per_second"] == pytest.approx(ls["prompt_n"] / (ls["prompt_ms"] / 1000), rel=1e-3)
    if ls["predicted_ms"] > 0:
        assert ls["predicted_per_second"] == pytest.approx(ls["predicted_n"] / (ls["predicted_ms"] / 1000), rel=1e-3)
        assert ls["predicted_per_second"] == t["tokens_per_second"]


def test_timings_shape_with_a_prefix_cache_hit() -> None:
    gen = Generation(
        text="hi", finish_reason="length", prompt_tokens=40, completion_tokens=4, cached_prompt_tokens=30,
        prompt_eval_ms=20.0, ttft_ms=21.5, eval_ms=30.0, total_ms=52.25, token_ms=[21.5, 10.0, 10.0, 10.0],
    )  # fmt: skip
    t = timings(gen, queue_ms=3.0, load_ms=120.5)
    usage = {"prompt_tokens": 40, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 30}}
    check_consistent(usage, t)
    assert t["ollama"] == {
        "load_duration": 120_500_000, "prompt_eval_count": 10, "prompt_eval_duration": 20_000_000,
        "eval_count": 4, "eval_duration": 30_000_000, "total_duration": 52_250_000,
    }  # fmt: skip
    # 10 evaluated tokens in 20 ms: 500 tok/s, not the 2000 tok/s that counting the cached 30 would claim.
    assert t["llama_server"]["prompt_per_second"] == 500.0
    assert t["llama_server"]["predicted_per_second"] == pytest.approx(4 / 0.030, rel=1e-3)


@pytest.mark.parametrize("cached", [-3, 0, 25, 40, 55])
def test_usage_and_timings_count_reused_prompt_tokens_alike(cached: int) -> None:
    """An engine's reused-prefix count outside 0..prompt_tokens is clamped once, in Generation, so the usage
    block, the timings and the worker metrics can never disagree about it."""
    gen = Generation(text="x", finish_reason="stop", prompt_tokens=40, completion_tokens=2,
                     cached_prompt_tokens=cached, prompt_eval_ms=10.0, eval_ms=4.0, total_ms=15.0,
                     token_ms=[11.0, 4.0])  # fmt: skip
    row = DatasetRow(line=1, custom_id="r", endpoint=COMPLETIONS, prompt="p")
    usage = response_body(row, gen, "m:q4_0", "req")["usage"]
    check_consistent(usage, timings(gen, queue_ms=0.0, load_ms=0.0))
    assert usage["prompt_tokens_details"]["cached_tokens"] == gen.reused_prompt_tokens == min(max(cached, 0), 40)
    assert gen.evaluated_prompt_tokens == 40 - gen.reused_prompt_tokens


@pytest.mark.model
def test_real_model_lines_carry_ollama_and_llama_server_timings(
    tmp_path: Path, settings: Settings, smollm2_path: Path
) -> None:
    data = tmp_path / "two.jsonl"
    rows = [
        {"id": "colour", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8},
        {"id": "count", "prompt": "One, two, three,", "max_tokens": 8, "temperature": 0},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "two.results.jsonl"
    proc = run_cli(settings, "run", str(data), "--model", "smollm2-135m-instruct", "-o", str(out),
                   "--workers", "1", "--threads", "2", env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == ["colour", "count"]
    for line in lines:
        usage = line["response"]["body"]["usage"]
        t = line["tokenmill"]["timings"]
        check_consistent(usage, t)
        assert 1 <= usage["completion_tokens"] <= 8 and usage["prompt_tokens"] > 0
        # A real model: its load took time, and every request evaluated a prompt and produced tokens.
        assert t["ollama"]["load_duration"] > 0 and t["ollama"]["prompt_eval_duration"] > 0
        assert t["llama_server"]["prompt_n"] > 0 and t["llama_server"]["prompt_per_second"] > 0
        assert t["ollama"]["total_duration"] > 0
        if usage["completion_tokens"] > 1:
            assert t["llama_server"]["predicted_per_second"] > 0

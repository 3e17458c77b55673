"""A folder of real texts of different kinds through `tokenmill run` with the real model: every file answered
with nothing but a template, no request over its context, and one answer per file with --combine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.conftest import run_cli
from tests.corpus import small_texts
from tokenmill.config import Settings
from tokenmill.models.tokenizer import load_tokenizer
from tokenmill.store import Store
from tokenmill.store.tables import Job, RequestRow

pytestmark = pytest.mark.model
FILES = ["compte-rendu.md", "kaigi.txt", "licenses/apache-2.0-head.txt", "licenses/bsd.txt", "textwrap.py.txt"]


def jobs_and_prompts(settings: Settings) -> list[tuple[Job, list[str]]]:
    store = Store(settings.database_url)
    try:
        with store.session() as s:
            jobs = list(s.scalars(select(Job).order_by(Job.created_at)))
            out = []
            for job in jobs:
                rows = s.scalars(select(RequestRow).where(RequestRow.job_id == job.id).order_by(RequestRow.seq))
                out.append((job, [r.payload["messages"][-1]["content"] for r in rows]))
            return out
    finally:
        store.dispose()


def template(tmp_path: Path) -> Path:
    path = tmp_path / "prompt.txt"
    path.write_text("Summarize this document in one sentence.\n\n{text}\n", encoding="utf-8")
    return path


@pytest.mark.timeout(600)
def test_real_texts_run_with_only_a_template(tmp_path: Path, settings: Settings, smollm2_path: Path) -> None:
    docs = small_texts(tmp_path / "docs")
    proc = run_cli(settings, "run", str(docs), "--template", str(template(tmp_path)), "--max-tokens", "12",
                   "--workers", "1", timeout=540)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "context: 2,048 tokens per request" in proc.stderr  # every file fits a worker's default whole
    lines = [json.loads(line) for line in (tmp_path / "docs.results.jsonl").read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == FILES
    assert all(line["response"]["body"]["choices"][0]["message"]["content"].strip() for line in lines)
    tok = load_tokenizer(smollm2_path)
    [(_, prompts)] = jobs_and_prompts(settings)
    for prompt in prompts:
        assert tok.prompt_tokens(prompt) + 12 <= 2048


@pytest.mark.timeout(600)
def test_combine_gives_one_answer_per_file(tmp_path: Path, settings: Settings, smollm2_path: Path) -> None:
    """At 384 tokens per request three files need several parts; their answers are combined by the model."""
    docs = small_texts(tmp_path / "docs")
    out = tmp_path / "summaries.jsonl"
    proc = run_cli(settings, "run", str(docs), "--template", str(template(tmp_path)), "--max-tokens", "12",
                   "--n-ctx", "384", "--combine", "-o", str(out), "--workers", "1", timeout=540)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == FILES
    combined = {line["custom_id"]: line for line in lines if line["tokenmill"].get("parts", 1) > 1}
    assert "licenses/apache-2.0-head.txt" in combined and len(combined) >= 2
    parts = [json.loads(line) for line in (tmp_path / "summaries.parts.jsonl").read_text().splitlines()]
    for name, line in combined.items():
        assert line["response"]["body"]["choices"][0]["message"]["content"].strip()
        mine = [p for p in parts if p["tokenmill"]["source"] == name]
        assert sum("#part-" in p["custom_id"] for p in mine) == line["tokenmill"]["parts"]
        assert any("#combine-" in p["custom_id"] for p in mine)
        usage = line["response"]["body"]["usage"]
        for key in ("prompt_tokens", "completion_tokens"):
            assert usage[key] == sum(p["response"]["body"]["usage"][key] for p in mine)
    tok = load_tokenizer(smollm2_path)
    jobs = jobs_and_prompts(settings)
    assert len(jobs) >= 2 and jobs[1][0].options["combine_round"] == 1  # the parts, then a combine round
    for job, prompts in jobs:
        assert job.options["n_ctx"] == 384 and job.state == "completed"
        for prompt in prompts:
            assert tok.prompt_tokens(prompt) + 12 <= 384

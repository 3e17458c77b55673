"""`tokenmill submit` and the request contract: unknown fields, --allow-unknown-fields, the lines' model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlalchemy import select

from tests.conftest import STUB_ENV, WORKER_ENV, run_cli
from tokenmill.config import Settings
from tokenmill.store import Store
from tokenmill.store.tables import Job

CHAT_URL = "/v1/chat/completions"


def batch_file(path: Path, bodies: list[dict[str, Any]]) -> Path:
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": CHAT_URL,
            "body": {"messages": [{"role": "user", "content": "hi"}], **b},
        }
        for i, b in enumerate(bodies)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def job_family(settings: Settings, job_id: str) -> str:
    store = Store(settings.database_url)
    try:
        with store.session() as s:
            job = s.scalars(select(Job).where(Job.id == job_id)).one()
            return str(job.family)
    finally:
        store.dispose()


def test_unknown_field_fails_submit_and_allow_unknown_fields_warns(tmp_path: Path, settings: Settings) -> None:
    data = batch_file(tmp_path / "b.jsonl", [{"max_tokens": 4}, {"max_token": 4, "functions": []}, {"max_token": 2}])
    refused = run_cli(settings, "submit", str(data), timeout=60)
    assert refused.returncode == 3, refused.stderr
    assert "b.jsonl:2: field 'body.max_token'" in refused.stderr and "Traceback" not in refused.stderr

    allowed = run_cli(settings, "submit", str(data), "--allow-unknown-fields", timeout=60)
    assert allowed.returncode == 0, allowed.stderr
    err = " ".join(allowed.stderr.split())
    assert "ignored unknown field 'body.max_token' on 2 lines (first on line 2)" in err
    assert "ignored unknown field 'body.functions' on 1 line (first on line 2)" in err
    assert "3 rows stored" in err


def test_run_allow_unknown_fields_counts_names_and_lines_in_the_summary(tmp_path: Path, settings: Settings) -> None:
    """`run` refuses the same line as submit; allowed, its summary counts field names and lines (stub engine)."""
    data = batch_file(tmp_path / "b.jsonl", [{"max_tokens": 4}, {"max_token": 4, "functions": []}, {"max_token": 2}])
    refused = run_cli(settings, "run", str(data), timeout=60)
    assert refused.returncode == 3 and "Traceback" not in refused.stderr
    assert "b.jsonl:2: field 'body.max_token'" in refused.stderr

    env = {**STUB_ENV, **WORKER_ENV, "COLUMNS": "400"}
    allowed = run_cli(settings, "run", str(data), "--allow-unknown-fields", "--workers", "1", env=env)
    assert allowed.returncode == 0, allowed.stderr
    warnings = [line for line in allowed.stderr.splitlines() if line.startswith("warning: ignored unknown field")]
    assert len(warnings) == 2, allowed.stderr  # one per field name, however many lines carry it
    summary = " ".join(allowed.stdout.split())
    assert "ignored fields │ 2 unknown field names on 2 lines" in summary, allowed.stdout
    assert len((tmp_path / "b.results.jsonl").read_text().splitlines()) == 3


def test_the_job_model_comes_from_the_lines(tmp_path: Path, settings: Settings) -> None:
    openai_file = batch_file(tmp_path / "openai.jsonl", [{"model": "gpt-4o-mini"}, {"model": "gemma-3-270m"}])
    proc = run_cli(settings, "submit", str(openai_file), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert job_family(settings, proc.stdout.split()[-1]) == "gemma-3-270m"

    mixed = batch_file(tmp_path / "mixed.jsonl", [{"model": "gemma-3-270m"}, {}, {"model": "smollm2-135m-instruct"}])
    bad = run_cli(settings, "submit", str(mixed), timeout=60)
    assert bad.returncode == 3
    assert "mixed.jsonl:3: field 'body.model'" in bad.stderr and "named on line 1" in " ".join(bad.stderr.split())

    pinned = run_cli(settings, "submit", str(openai_file), "--model", "smollm2-135m-instruct", timeout=60)
    assert pinned.returncode == 3 and "openai.jsonl:2: field 'body.model'" in pinned.stderr

    plain = batch_file(tmp_path / "plain.jsonl", [{"model": "gpt-4o-mini"}])
    ok = run_cli(settings, "submit", str(plain), timeout=60)
    assert ok.returncode == 0 and job_family(settings, ok.stdout.split()[-1]) == "smollm2-135m-instruct"

"""`tokenmill run` end to end: real CLI process, real Celery worker processes, real model, real SQLite."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import STUB_ENV, run_cli
from tests.workers.fake_gpu import TWO_GPUS, gpu_host_env
from tokenmill.config import Settings
from tokenmill.host import GpuInfo
from tokenmill.workers.capacity import usable_gpus

pytestmark = pytest.mark.model


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_run_generates_every_row_with_timings(tmp_path: Path, settings: Settings, smollm2_path: Path) -> None:
    long_prompt = "word " * 9000  # longer than SmolLM2's trained context (8192): must fail alone
    data = write_jsonl(
        tmp_path / "docs.jsonl",
        [
            {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
             "body": {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 12, "temperature": 0}},
            {"id": "b", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 10, "temperature": 0},
            {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "stop": ["."]},
            {"custom_id": "d", "method": "POST", "url": "/v1/completions",
             "body": {"prompt": "One, two, three,", "max_tokens": 6, "temperature": 0}},
            {"id": "too-long", "prompt": long_prompt, "max_tokens": 8},
        ],
    )  # fmt: skip
    out, err = tmp_path / "docs.results.jsonl", tmp_path / "docs.errors.jsonl"
    proc = run_cli(settings, "run", str(data), "--model", "smollm2-135m-instruct", "-o", str(out), "--errors", str(err),
                   "--workers", "1", "--threads", "2")  # fmt: skip
    assert proc.returncode == 7, proc.stderr  # JobIncomplete: one row failed, the rest succeeded
    assert "1 of 5 rows failed" in proc.stderr
    assert "engine busy" in proc.stdout and "of slots filled over" in proc.stdout  # from the job's slot use
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == ["a", "b", "line-3", "d"]
    for line in lines:
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["usage"]["completion_tokens"] >= 1
        tm = line["tokenmill"]
        assert tm["model"] == "smollm2-135m-instruct:q4_1"
        assert tm["worker"].startswith("local0:")
        t = tm["timings"]
        assert len(t["token_ms"]) == body["usage"]["completion_tokens"]
        assert t["ttft_ms"] > 0 and t["total_ms"] >= t["ttft_ms"] and t["tokens_per_second"] > 0
        assert t["queue_ms"] >= 0 and t["ollama"]["eval_count"] == body["usage"]["completion_tokens"]
    assert lines[0]["response"]["body"]["object"] == "chat.completion"
    assert lines[0]["response"]["body"]["choices"][0]["message"]["content"].strip()
    assert lines[2]["response"]["body"]["object"] == "text_completion"
    assert "." not in lines[2]["response"]["body"]["choices"][0]["text"]
    errors = [json.loads(line) for line in err.read_text().splitlines()]
    assert len(errors) == 1 and errors[0]["custom_id"] == "too-long"
    assert errors[0]["error"]["code"] == "context_length_exceeded" and errors[0]["error"]["line"] == 5
    db = sqlite3.connect(settings.data_dir / "tokenmill.db")
    assert db.execute("select count(*), count(distinct seq) from results").fetchone() == (5, 5)
    assert db.execute("select state from jobs").fetchone() == ("completed_with_errors",)
    # run killed its idle worker once the job was done and recorded it as stopped, not lost
    assert db.execute("select state from workers").fetchall() == [("stopped",)]


def test_run_rejects_bad_input_before_loading_anything(tmp_path: Path, settings: Settings) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "ok"}\n{"prompt": "x", "max_tokens": -3}\n', encoding="utf-8")
    proc = run_cli(settings, "run", str(data), timeout=60)
    assert proc.returncode == 3
    assert "Traceback" not in proc.stderr
    message = " ".join(proc.stderr.split())
    assert f"{data}:2" in message and "max_tokens" in message
    db = settings.data_dir / "tokenmill.db"
    if db.exists():  # the ingest transaction rolled back: no job, no row
        assert sqlite3.connect(db).execute(
            "select (select count(*) from jobs) + (select count(*) from requests)"
        ).fetchone() == (0,)


@pytest.mark.parametrize(
    "command",
    [("run",), ("run", "--model", "smollm2-135m-instruct"), ("submit",)],
    ids=["run", "run-model", "submit"],
)
def test_a_line_nested_100000_deep_is_a_line_error_on_every_cli_path(
    tmp_path: Path, settings: Settings, command: tuple[str, ...]
) -> None:
    """Without --model, `run` and `submit` read the first lines for body.model before the reader: the same
    parser, so the same line error, never a RecursionError traceback."""
    data = tmp_path / "deep.jsonl"
    data.write_bytes(b'{"prompt": "ok"}\n' + b"[" * 100_000 + b"\n")
    proc = run_cli(settings, command[0], str(data), *command[1:], timeout=60, env={"COLUMNS": "400"})
    assert "Traceback" not in proc.stderr and "RecursionError" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 3, proc.stderr
    assert f"{data}:2: invalid JSON: nested too deeply" in " ".join(proc.stderr.split())


def test_run_unknown_model_is_a_clean_error(tmp_path: Path, settings: Settings) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "hi"}])
    proc = run_cli(settings, "run", str(data), "--model", "smollm3-9000b", timeout=60)
    assert proc.returncode == 4 and "Traceback" not in proc.stderr
    assert "smollm3-9000b" in proc.stderr


def test_run_skip_invalid_keeps_skipped_lines(tmp_path: Path, settings: Settings, smollm2_path: Path) -> None:
    """Skipped lines stay in the errors file beside failed rows, are counted, and make the exit code 7.

    The model is given as a path: results record its content identity, not its file name.
    """
    model = tmp_path / "model.gguf"
    model.symlink_to(smollm2_path)
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"id": "a", "prompt": "One, two,", "max_tokens": 3, "temperature": 0}) + "\n"
        + '{"id": "bad", "prompt": "x", "max_tokens": -3}\n'
        + json.dumps({"id": "long", "prompt": "word " * 9000, "max_tokens": 3}) + "\n"  # over the trained 8192
        + "{not json\n",
        encoding="utf-8",
    )
    out, err = tmp_path / "d.results.jsonl", tmp_path / "d.errors.jsonl"
    proc = run_cli(settings, "run", str(data), "--model", str(model), "-o", str(out), "--errors", str(err),
                   "--skip-invalid", "--workers", "1", "--threads", "2")  # fmt: skip
    assert proc.returncode == 7, proc.stderr
    message = " ".join(proc.stderr.split())
    assert "1 of 2 rows failed, 2 invalid lines skipped" in message
    assert "2 invalid lines (not run" in " ".join(proc.stdout.split())
    errors = [json.loads(line) for line in err.read_text().splitlines()]
    assert [(e["custom_id"], e["error"]["code"], e["error"]["line"]) for e in errors] == [
        ("bad", "invalid_request", 2), ("long", "context_length_exceeded", 3), ("line-4", "invalid_request", 4),
    ]
    [line] = [json.loads(line) for line in out.read_text().splitlines()]
    sha = hashlib.sha256(smollm2_path.read_bytes()).hexdigest()
    assert line["tokenmill"]["model"] == f"file:model@{sha[:12]}"
    assert line["response"]["body"]["model"] == f"file:model@{sha[:12]}"


def test_run_summary_shows_where_the_seconds_went(tmp_path: Path, settings: Settings) -> None:
    """Stub engine, so this is about start-up and the phases line, not generation."""
    rows: list[dict[str, object]] = [{"id": f"r{i}", "prompt": f"say {i}", "max_tokens": 4} for i in range(40)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    env = {**STUB_ENV, "TOKENMILL_STUB_DELAY": "0.01", "HF_HUB_OFFLINE": "1", "COLUMNS": "400"}
    proc = run_cli(settings, "run", str(data), "--workers", "2", "--threads", "1", "--chunk-size", "10", env=env)
    assert proc.returncode == 0, proc.stderr
    line = next(row for row in proc.stdout.splitlines() if "phases" in row)
    marks = re.findall(r"(workers spawned|stored|first chunk claimed|finished|exit) (\d+\.\d) s", line)
    names = [name for name, _ in marks]
    # the workers start while the store is opened and the dataset stored: either may come first
    assert sorted(names[:2]) == ["stored", "workers spawned"], line
    assert names[2:] == ["first chunk claimed", "finished", "exit"], line
    seconds = [float(t) for _, t in marks]
    assert seconds == sorted(seconds), line  # each phase ends after the one before it
    assert len((tmp_path / "d.results.jsonl").read_text().splitlines()) == 40


def test_a_stub_runs_answers_never_reach_a_real_run(tmp_path: Path, settings: Settings, smollm2_path: Path) -> None:
    """The engine is part of the model's identity: cache key, job key, queue and variant label."""
    data = write_jsonl(
        tmp_path / "a.jsonl",
        [{"id": i, "messages": [{"role": "user", "content": f"Say {i}."}], "max_tokens": 3, "temperature": 0}
         for i in ("a", "b")],
    )  # fmt: skip
    out = tmp_path / "a.results.jsonl"
    args = ("run", str(data), "--model", "smollm2-135m-instruct", "-o", str(out), "--workers", "1")
    stub = run_cli(settings, *args, env=STUB_ENV)
    assert stub.returncode == 0, stub.stderr
    stubbed = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["tokenmill"]["model"].endswith("+stub") for r in stubbed), stubbed
    real = run_cli(settings, *args)
    assert real.returncode == 0, real.stderr
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(answers) == 2
    for r in answers:
        assert r["tokenmill"]["cached"] is False and "stub" not in r["tokenmill"]["model"], r
        assert not r["response"]["body"]["choices"][0]["message"]["content"].startswith("echo:"), r


@pytest.mark.timeout(180)
def test_run_on_a_two_gpu_host_starts_one_pinned_worker_per_gpu(tmp_path: Path, settings: Settings) -> None:
    """NVML and the offload probe stood in (stub engine): `run` starts one worker per GPU, each sees only its
    own GPU and sizes the model for it with every layer offloaded."""
    rows: list[dict[str, object]] = [{"id": f"r{i}", "prompt": f"say {i}", "max_tokens": 4} for i in range(20)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    env = {**STUB_ENV, "HF_HUB_OFFLINE": "1", **gpu_host_env(tmp_path / "gpu", TWO_GPUS, offload=True)}
    proc = run_cli(settings, "run", str(data), "--threads", "1", "--chunk-size", "5", env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len((tmp_path / "d.results.jsonl").read_text().splitlines()) == 20
    with sqlite3.connect(settings.data_dir / "tokenmill.db") as db:
        workers = db.execute("SELECT capacity, device, choice FROM workers").fetchall()
    assert len(workers) == 2, workers
    seen = sorted(tuple(g["uuid"] for g in json.loads(cap)["gpus"]) for cap, _, _ in workers)
    assert seen == sorted((uuid,) for *_, uuid in TWO_GPUS)
    for cap, device, choice in workers:
        gpu = json.loads(cap)["gpus"][0]["name"]
        assert device == "cuda" and "(full offload" in choice and f"GPU{0 if 'H100' in gpu else 1} {gpu}" in choice


@pytest.mark.gpu
@pytest.mark.timeout(240)
def test_run_on_the_gpu_offloads_every_layer(
    tmp_path: Path, settings: Settings, smollm2_path: Path, cuda_gpu: GpuInfo
) -> None:
    """The real model on a real GPU, with `run`'s defaults: one worker per GPU, every layer on it."""
    rows: list[dict[str, object]] = [{"id": f"r{i}", "prompt": f"Count to {i}.", "max_tokens": 16} for i in range(24)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    proc = run_cli(settings, "run", str(data), "--model", "smollm2-135m-instruct:q4_1", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [json.loads(x) for x in (tmp_path / "d.results.jsonl").read_text().splitlines()]
    assert len(lines) == 24 and all(x["response"]["status_code"] == 200 for x in lines)
    with sqlite3.connect(settings.data_dir / "tokenmill.db") as db:
        workers = db.execute("SELECT device, choice, capacity FROM workers").fetchall()
    assert len(workers) == len(usable_gpus()), workers
    for device, choice, cap in workers:
        assert device == "cuda" and "(full offload" in choice, choice
        assert len(json.loads(cap)["gpus"]) == 1  # pinned: each worker sees its own GPU only

"""The errors file: a failed row and a rejected input line are written in the same OpenAI batch error shape."""

from __future__ import annotations

from pathlib import Path

from tokenmill.datasets import validate_dataset
from tokenmill.output import failed_line, rejected_line
from tokenmill.store.tables import RequestRow, Result


def test_failed_line_is_an_openai_batch_error_with_tokenmills_details() -> None:
    result = Result(job_id="j1", seq=7, custom_id="q7", status="failed", error_code=None, error="boom",
                    worker_id="host:1:abc", variant="m:q4_0", attempts=3)  # fmt: skip
    request = RequestRow(job_id="j1", seq=7, chunk_index=0, line=9, custom_id="q7", payload={})
    assert failed_line(result, request) == {
        "id": "batch_req_j1_7",
        "custom_id": "q7",
        "response": None,
        "error": {"code": "generation_failed", "message": "boom", "line": 9},
        "tokenmill": {"worker": "host:1:abc", "model": "m:q4_0", "attempts": 3},
    }


def test_both_error_lines_share_the_batch_shape(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": 1}\n', encoding="utf-8")
    rejected = rejected_line(validate_dataset(path).invalid[0], path)
    result = Result(job_id="j", seq=0, custom_id="c", status="failed", error_code="context_length_exceeded",
                    error="too long", attempts=1)  # fmt: skip
    failed = failed_line(result, RequestRow(line=1))
    assert set(failed) - set(rejected) == {"tokenmill"}
    assert set(rejected["error"]) == set(failed["error"]) == {"code", "message", "line"}
    assert (rejected["error"]["code"], failed["error"]["code"]) == ("invalid_request", "context_length_exceeded")

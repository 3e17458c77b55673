"""The errors file: a failed row and a rejected input line are written in the same OpenAI batch error shape."""

from __future__ import annotations

import json
from pathlib import Path

from tokenmill.datasets import validate_dataset
from tokenmill.output import export, failed_line, jsonl_lines, output_line, rejected_line
from tokenmill.rows import CHAT, DatasetRow
from tokenmill.store import Store
from tokenmill.store import jobs as store_jobs
from tokenmill.store import results as store_results
from tokenmill.store.states import ResultStatus
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


def _stored_job(store: Store) -> str:
    """A job with a succeeded row (non-ASCII text, a document source, cached), a failed one, and one with
    no timings: the cases where text built around stored JSON could drift from :func:`output_line`."""
    with store.session() as s:
        job = store_jobs.create_job(s, key="k", name="t.jsonl", family="fam", queue="tm.fam", chunk_size=3)
        rows = [DatasetRow(line=i + 2, custom_id=f'q"{i}', endpoint=CHAT, messages=({"role": "user", "content": "x"},),
                           source="doc ü.txt" if i == 0 else None) for i in range(3)]  # fmt: skip
        store_jobs.ingest_rows(s, job, rows)
        body = {"choices": [{"message": {"content": 'naïve \u2603 "quoted"\n'}}], "usage": {"total_tokens": 3}}
        common = {"job_id": job.id, "worker_id": "h:1:a", "variant": "m:q4"}
        store_results.write_result(
            s,
            {
                **common,
                "seq": 0,
                "custom_id": 'q"0',
                "status": ResultStatus.SUCCEEDED,
                "body": body,
                "timings": {"ttft_ms": 1.5, "token_ms": [1.0]},
                "cached": True,
            },
        )
        store_results.write_result(
            s,
            {
                **common,
                "seq": 1,
                "custom_id": 'q"1',
                "status": ResultStatus.FAILED,
                "error_code": "generation_failed",
                "error": "line 3: boom",
                "attempts": 3,
            },
        )
        store_results.write_result(s, {**common, "seq": 2, "custom_id": 'q"2', "status": ResultStatus.SUCCEEDED,
                                       "body": body, "timings": None, "attempts": 2})  # fmt: skip
        return job.id


def test_export_lines_equal_output_line_of_the_stored_rows(any_store: Store, tmp_path: Path) -> None:
    """The fast export splices stored JSON into text; what a reader parses must be exactly output_line."""
    store = any_store
    job_id = _stored_job(store)
    out, err = tmp_path / "o.jsonl", tmp_path / "e.jsonl"
    assert export(store, job_id, out, err) == (2, 1)
    with store.session() as s:
        pairs = list(store_results.iter_results(s, job_id))
        expected = [output_line(r, q) for r, q in pairs if r.status == ResultStatus.SUCCEEDED]
        expected_err = [failed_line(r, q) for r, q in pairs if r.status != ResultStatus.SUCCEEDED]
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == expected
    assert expected[0]["tokenmill"]["source"] == "doc ü.txt" and expected[1]["tokenmill"]["timings"] == {}
    assert [json.loads(line) for line in err.read_text(encoding="utf-8").splitlines()] == expected_err
    assert "".join(jsonl_lines(store, job_id)).splitlines() == lines  # the HTTP download is the same file
    assert [json.loads(x) for x in jsonl_lines(store, job_id, errors=True)] == expected_err

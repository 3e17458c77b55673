"""Ingest bounds a chunk's prompt bytes as well as its rows: a chunk of huge rows must not be one lease."""

from __future__ import annotations

from sqlalchemy import select

from tokenmill.rows import COMPLETIONS, DatasetRow, SamplingParams
from tokenmill.store import Store
from tokenmill.store import jobs as store_jobs
from tokenmill.store import results as store_results
from tokenmill.store.tables import Chunk, RequestRow


def _rows(sizes: list[int]) -> list[DatasetRow]:
    return [
        DatasetRow(i + 1, f"r{i}", COMPLETIONS, prompt="x" * n, params=SamplingParams(max_tokens=4))
        for i, n in enumerate(sizes)
    ]


def test_chunks_are_cut_by_prompt_bytes_as_well_as_rows(any_store: Store) -> None:
    bound = 1 << 20  # store_jobs.MAX_CHUNK_PROMPT_CHARS
    big = bound * 2 // 5  # two fit a chunk, a third does not
    sizes = [big] * 5 + [10] * 6 + [bound * 2] + [10]
    with any_store.session() as s:
        job = store_jobs.create_job(s, key="k", name="huge.jsonl", family="f", queue="tm.f", chunk_size=4)
        assert store_jobs.ingest_rows(s, job, _rows(sizes)) == len(sizes)
        job_id = job.id
    with any_store.session() as s:
        chunks = list(s.scalars(select(Chunk).where(Chunk.job_id == job_id).order_by(Chunk.idx)))
        spans = [(c.first_seq, c.last_seq) for c in chunks]
        # 2+2+1 big rows, the small ones 4 to a chunk, the oversized row alone
        assert spans == [(0, 1), (2, 3), (4, 7), (8, 10), (11, 11), (12, 12)], spans
        assert store_jobs.get_job(s, job_id).n_chunks == len(spans)
        index = dict(s.execute(select(RequestRow.seq, RequestRow.chunk_index).where(RequestRow.job_id == job_id)).all())
        assert all(index[seq] == c.idx for c in chunks for seq in range(c.first_seq, c.last_seq + 1))
        for c in chunks:
            c.state = "done"
        store_results.write_result(
            s, {"job_id": job_id, "seq": 9, "custom_id": "r9", "status": "failed", "error": "x", "attempts": 1}
        )
        store_jobs.get_job(s, job_id).state = "completed_with_errors"
    with any_store.session() as s:
        assert store_jobs.retry_failed(s, store_jobs.get_job(s, job_id)) == 1
        reopened = s.scalars(select(Chunk.idx).where(Chunk.job_id == job_id, Chunk.state == "pending")).all()
        assert list(reopened) == [3]  # the chunk that really holds seq 9, not 9 // chunk_size
    assert bound == store_jobs.MAX_CHUNK_PROMPT_CHARS

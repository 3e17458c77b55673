"""The dashboard's reads on a real SQLite store: progress counts, ETA, and the finished-job count cache."""

from __future__ import annotations

import time

import pytest

from tokenmill.rows import COMPLETIONS, DatasetRow
from tokenmill.store import Store, views
from tokenmill.store import jobs as store_jobs
from tokenmill.store import results as store_results
from tokenmill.store import workers as store_workers
from tokenmill.store.tables import Job


def _job(store: Store, n: int) -> str:
    with store.session() as s:
        job = store_jobs.create_job(s, key="k", name="d.jsonl", family="smollm2-135m-instruct", queue="q", chunk_size=2)
        store_jobs.ingest_rows(
            s, job, [DatasetRow(line=i + 1, custom_id=f"c{i}", endpoint=COMPLETIONS, prompt="p") for i in range(n)]
        )
        job.state, job.started_at = "running", time.time() - 10
        return job.id


def _result(store: Store, job_id: str, seq: int, status: str = "succeeded", tokens: int = 5) -> None:
    with store.session() as s:
        store_results.write_result(
            s, {"job_id": job_id, "seq": seq, "custom_id": f"c{seq}", "status": status, "completion_tokens": tokens}
        )


def test_progress_eta_and_tokens_per_second(store: Store) -> None:
    job_id = _job(store, 4)
    _result(store, job_id, 0)
    _result(store, job_id, 1, status="failed", tokens=0)
    with store.session() as s:
        (view,) = views.recent_jobs(s)
    assert (view.total, view.done, view.succeeded, view.failed, view.percent) == (4, 2, 1, 1, 50.0)
    assert view.started_at is not None and view.elapsed_s == view.now - view.started_at > 0  # started 10 s back
    assert view.tokens_per_second == 5 / view.elapsed_s
    assert view.eta_s == pytest.approx(view.elapsed_s)  # half done: as long again
    with store.session() as s:
        assert views.job_view(s, "missing") is None


def test_finished_jobs_are_not_recounted_until_reopened(store: Store) -> None:
    job_id = _job(store, 3)
    _result(store, job_id, 0)
    _result(store, job_id, 1)
    with store.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.state, job.finished_at = "completed", time.time()
    with store.session() as s:
        assert views.recent_jobs(s)[0].done == 2
    _result(store, job_id, 2)  # a write the finished job cannot see: its counts come from the cache
    with store.session() as s:
        assert views.recent_jobs(s)[0].done == 2 and views.job_view(s, job_id).eta_s is None  # type: ignore[union-attr]
        job = s.get(Job, job_id)
        assert job is not None
        job.state, job.finished_at = "queued", None  # what a retry does
    with store.session() as s:
        view = views.recent_jobs(s)[0]
    assert view.done == 3 and not view.final


def test_workers_show_load_and_lost(store: Store) -> None:
    with store.session() as s:
        store_workers.register(s, id="a", name="a", host="h1", pid=1, state="busy", n_seq=8, current_job="j1")
        store_workers.register(s, id="b", name="b", host="h2", pid=2, state="ready")
        store_workers.register(s, id="c", name="c", host="h3", pid=3, state="stopped")
    with store.session() as s:
        listed = {w.id: w for w in views.workers(s, lost_after=10)}
        assert set(listed) == {"a", "b"} and listed["a"].load == "busy on j1 (8 slots)" and listed["b"].load == "idle"
        assert {w.id for w in views.workers(s, lost_after=10, include_stopped=True)} == {"a", "b", "c"}
        assert {w.state for w in views.workers(s, lost_after=-1)} == {"lost"}  # heartbeats older than the limit

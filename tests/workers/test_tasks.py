"""The Celery task reaches its worker runtime through the app it was registered on, not a module global."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from tests.observability.helpers import write_prompts
from tokenmill.celery_app import TASK_PROCESS_CHUNK, make_app, queue_for
from tokenmill.config import Settings
from tokenmill.engines.stub import StubEngine
from tokenmill.scheduler.submit import Submission, submit_dataset
from tokenmill.store import Store
from tokenmill.store import workers as store_workers
from tokenmill.store.tables import Chunk, Result
from tokenmill.workers import tasks
from tokenmill.workers.runtime import WorkerRuntime


def _runtime(settings: Settings, store: Store, tmp_path: Path) -> WorkerRuntime:
    engine = StubEngine(tmp_path / "unused.gguf", "smollm2-135m-instruct:q4_1", n_seq=2)
    with store.session() as s:  # a claim checks the job's queue against the queues the worker registered
        store_workers.register(
            s, id="w-task", name="w-task", host="h", pid=1, state="ready", queues=[queue_for("smollm2-135m-instruct")]
        )
    return WorkerRuntime(settings=settings, store=store, engine=engine, worker_id="w-task", model_id="m")


def test_the_registered_task_serves_a_chunk_with_its_bound_runtime(
    settings: Settings, store: Store, tmp_path: Path
) -> None:
    data = write_prompts(tmp_path / "d.jsonl", 4)
    job_id, _, _ = submit_dataset(store, Submission(path=data, model="smollm2-135m-instruct", chunk_size=4))
    with store.session() as s:
        (chunk_id,) = s.scalars(select(Chunk.id).where(Chunk.job_id == job_id))
    app = make_app(settings)
    task = tasks.register(app, _runtime(settings, store, tmp_path))
    assert app.tasks[TASK_PROCESS_CHUNK] is task
    summary = {"claimed": True, "generated": 4, "cached": 0, "failed": 0, "chunks": 1, "stopped": None}
    assert task(job_id, chunk_id) == summary
    with store.session() as s:
        texts = {r.custom_id: (r.body or {})["choices"][0]["text"] for r in s.scalars(select(Result))}
    assert texts == {f"r{i}": f"echo:r{i}" for i in range(4)}
    assert task(job_id, chunk_id)["claimed"] is False  # done: a redelivered message finds nothing to claim


def test_registration_is_per_app(settings: Settings, store: Store, tmp_path: Path) -> None:
    """Another app in the same process (the scheduler's, Flower's) does not get the task or the runtime."""
    bound = make_app(settings)
    tasks.register(bound, _runtime(settings, store, tmp_path))
    other = make_app(settings)
    assert TASK_PROCESS_CHUNK in bound.tasks
    assert TASK_PROCESS_CHUNK not in other.tasks
    assert bound.conf.task_acks_late and bound.conf.accept_content == ["json"]  # the wire rules are the app's

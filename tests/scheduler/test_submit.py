"""Submitting: how a job is keyed, routed and cut into chunks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.poison_lines import POISON_IDS, POISON_LINES
from tokenmill.cache import request_hash
from tokenmill.celery_app import queue_for
from tokenmill.config import Settings
from tokenmill.errors import DatasetError
from tokenmill.rows import COMPLETIONS, DatasetRow, SamplingParams
from tokenmill.scheduler.submit import Submission, choose_model, job_key, model_route
from tokenmill.workers.capacity import detect
from tokenmill.workers.selection import WorkerOptions, select_model

GGUF_A = b"GGUF" + b"weights of fine-tune A" * 100
GGUF_B = b"GGUF" + b"weights of fine-tune B" * 100


def _worker_view(settings: Settings, model: Path) -> tuple[str, str]:
    """(queue, cache model id) of a worker started on ``model``."""
    sel = select_model(settings, WorkerOptions(model=str(model)), detect())
    return queue_for(sel.family_queue), sel.model_id


def test_gguf_paths_with_one_name_are_different_models(settings: Settings, tmp_path: Path) -> None:
    """v1/model.gguf next to v2/model.gguf: other queue, other cache key, other job."""
    v1, v2 = tmp_path / "v1" / "model.gguf", tmp_path / "v2" / "model.gguf"
    for path, data in ((v1, GGUF_A), (v2, GGUF_B)):
        path.parent.mkdir()
        path.write_bytes(data)
    (q1, id1), (q2, id2) = _worker_view(settings, v1), _worker_view(settings, v2)
    assert q1 != q2 and id1 != id2
    # The scheduler routes each job to the queue of the worker that serves those very bytes.
    assert queue_for(model_route(str(v1), settings.models_dir)[0]) == q1
    assert queue_for(model_route(str(v2), settings.models_dir)[0]) == q2
    row = DatasetRow(1, "r1", COMPLETIONS, prompt="hi", params=SamplingParams(temperature=0.0))
    assert request_hash(id1, row) != request_hash(id2, row)


def test_overwritten_gguf_is_a_new_job_queue_and_cache_key(settings: Settings, tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(GGUF_A)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "hi"}) + "\n")
    sub = Submission(path=data, model=str(model), models_dir=settings.models_dir)
    before = (job_key(data, str(model), sub.options()), model_route(str(model)), _worker_view(settings, model))
    model.write_bytes(GGUF_B)  # same size, another fine-tune
    os.utime(model, ns=(model.stat().st_atime_ns, model.stat().st_mtime_ns + 1_000_000))
    after = (job_key(data, str(model), sub.options()), model_route(str(model)), _worker_view(settings, model))
    assert all(b != a for b, a in zip(before, after, strict=True)), (before, after)


def test_document_edited_in_place_is_a_new_job(tmp_path: Path) -> None:
    """The folder's mtime and total size do not change when one document is rewritten with as many bytes."""
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("alpha")
    (docs / "sub" / "b.md").write_text("beta")
    options = {"template": "{text}"}
    first = job_key(docs, "m", options)
    assert job_key(docs, "m", options) == first  # unchanged: the same job resumes
    folder_mtime = (docs / "sub").stat().st_mtime_ns
    (docs / "sub" / "b.md").write_text("BETA")
    assert (docs / "sub").stat().st_mtime_ns == folder_mtime
    assert job_key(docs, "m", options) != first


@pytest.mark.parametrize(("poison", "words"), [p[1:] for p in POISON_LINES], ids=POISON_IDS)
def test_choosing_the_model_reads_poisoned_lines_through_the_dataset_reader(
    tmp_path: Path, poison: bytes, words: str
) -> None:
    """Without --model the first lines are read for body.model: a poisoned line is skipped there (the reader
    reports it, with its line), and a later line still names the model."""
    body = {"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}]}
    named = json.dumps({"custom_id": "a", "body": body})
    path = tmp_path / "poison.jsonl"
    path.write_bytes(b'{"prompt": "x"}\n' + poison + b"\n" + named.encode() + b"\n")
    assert choose_model(path, None) == ("gemma-3-270m", "named on line 3")
    sub = Submission(path=path, model="gemma-3-270m")
    with pytest.raises(DatasetError) as exc:
        list(sub.rows())
    assert exc.value.line == 2 and exc.value.reason.startswith("invalid JSON: ") and words in exc.value.reason

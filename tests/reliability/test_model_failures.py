"""A worker whose model cannot load says so in `tokenmill workers --json`, exits 4, and takes no work."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.conftest import STUB_ENV
from tests.reliability.conftest import MODEL, Stack, write_dataset

EXIT_MODEL_FAILED = 4


def corrupt_gguf(stack: Stack) -> tuple[str, list[str], dict[str, str], bool, str]:
    """GGUF magic, then garbage: passes the magic check, llama.cpp must refuse it (real engine)."""
    path = stack.tmp / "broken.gguf"
    path.write_bytes(b"GGUF" + os.urandom(64 * 1024))
    return str(path), [], {}, False, "could not load"


def wrong_sha256(stack: Stack) -> tuple[str, list[str], dict[str, str], bool, str]:
    """The catalog variant's file, same size, a few bytes changed, in a models dir of its own."""
    from tokenmill.models.resolve import resolve_model

    good = resolve_model(MODEL, stack.settings.models_dir, fetch=True).path
    models = stack.tmp / "models"
    target = models / MODEL / good.name
    target.parent.mkdir(parents=True)
    shutil.copyfile(good, target)
    with open(target, "r+b") as fh:
        fh.seek(target.stat().st_size // 2)
        fh.write(b"\x00corrupted\x00")
    return MODEL, [], {"TOKENMILL_MODELS_DIR": str(models)}, True, "sha256 mismatch"


def no_memory(stack: Stack) -> tuple[str, list[str], dict[str, str], bool, str]:
    """A context so large (8k tokens x 100k sequences) that no machine's sizing lets it fit."""
    return MODEL, ["--n-ctx", "8192", "--n-seq", "100000"], {}, True, "needs"


@pytest.mark.parametrize("case", [corrupt_gguf, wrong_sha256, no_memory], ids=lambda c: c.__name__)
def test_worker_that_cannot_load_fails_visibly_and_takes_no_work(embedded: Stack, case: object) -> None:
    model, args, env, stub, reason = case(embedded)  # type: ignore[operator]
    n = 20
    data = write_dataset(embedded.tmp / "d.jsonl", n)
    proc = embedded.cli("submit", str(data), "--model", model, "--chunk-size", "5", env=STUB_ENV)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().splitlines()[-1]
    embedded.scheduler()
    embedded.wait_state(job, ("running",), timeout=30)  # chunks are in the queue, waiting for a worker
    bad = embedded.worker(*args, name="broken", env=env, stub=stub, model=model)
    assert bad.wait(timeout=120) == EXIT_MODEL_FAILED, embedded.logs()
    listing = embedded.cli("workers", "--json")
    assert listing.returncode == 0, listing.stderr
    workers = [w for w in json.loads(listing.stdout) if w["id"].startswith("broken:")]
    assert len(workers) == 1, listing.stdout
    assert workers[0]["state"] == "failed" and reason in (workers[0]["error"] or ""), workers[0]
    counts = embedded.counts(job)
    chunks = embedded.chunk_states(job)
    print(
        f"\n{getattr(case, '__name__', case)}: worker failed with {workers[0]['error']!r}; "
        f"{counts}; chunks {dict(chunks)}"
    )
    assert counts.stored == 0 and chunks["running"] == 0 and chunks["done"] == 0
    attempts = embedded.query("SELECT coalesce(sum(attempts), 0) FROM chunks WHERE job_id = :j", j=job)[0][0]
    assert attempts == 0  # not one claim
    # The queued messages were left for a worker that can serve them.
    embedded.worker(name="healthy", model=model)
    embedded.wait_state(job, timeout=60)
    counts = embedded.counts(job)
    by_worker = embedded.query("SELECT DISTINCT worker_id FROM results WHERE job_id = :j", j=job)
    assert (counts.stored, counts.duplicated) == (n, 0)
    assert all(w.startswith("healthy:") for (w,) in by_worker), by_worker

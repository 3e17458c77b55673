"""A/B testing quantizations: `tokenmill submit --ab q4_1,q8_0` makes two pinned jobs in one group, and
each is served only by workers that loaded its variant.

The q8_0 file cannot be fetched offline, so a stand-in file sits at its catalog path (the catalog pins no
sha256 for hub-only variants, so it is accepted and hashed on first use) and the workers run the stub
engine: routing is the point here, not generation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from tests.conftest import STUB_ENV, Procs, run_cli
from tests.observability.helpers import start_stub_worker, wait_job, write_prompts
from tokenmill.config import Settings
from tokenmill.models.catalog import get_variant
from tokenmill.models.resolve import local_path
from tokenmill.store import Store
from tokenmill.store.tables import Job, Result, Worker

FAMILY = "smollm2-135m-instruct"


@pytest.mark.timeout(240)
def test_ab_submit_routes_each_variant_to_its_own_workers(
    tmp_path: Path, settings: Settings, procs: Procs, smollm2_path: Path
) -> None:
    models = tmp_path / "models"
    q4 = local_path(get_variant(f"{FAMILY}:q4_1"), models)
    q4.parent.mkdir(parents=True)
    q4.symlink_to(smollm2_path)  # the real file, verified against the catalog's sha256 at worker start
    q8_variant = get_variant(f"{FAMILY}:q8_0")
    assert q8_variant.sha256 is None and not q8_variant.size_exact  # else the stand-in below would be refused
    local_path(q8_variant, models).write_bytes(b"GGUF" + bytes(4096))
    settings = settings.with_(models_dir=models)

    data = write_prompts(tmp_path / "ab.jsonl", 5)
    proc = run_cli(settings, "submit", str(data), "--ab", "q4_1,q8_0", "--chunk-size", "2", timeout=120, env=STUB_ENV)
    assert proc.returncode == 0, proc.stderr
    ids = proc.stdout.split()
    assert len(ids) == 2 and ids[0] != ids[1]  # both job ids, one per line, and nothing else on stdout
    assert "5 rows stored twice (A/B group" in proc.stderr

    store = Store(settings.database_url)
    try:
        with store.session() as s:
            jobs = {j.pinned_variant: j for j in s.scalars(select(Job).where(Job.id.in_(ids)))}
            assert set(jobs) == {f"{FAMILY}:q4_1", f"{FAMILY}:q8_0"}
            job_a, job_b = jobs[f"{FAMILY}:q4_1"], jobs[f"{FAMILY}:q8_0"]
            assert [job_a.id, job_b.id] == ids  # printed in --ab order
            assert job_a.ab_group is not None and job_a.ab_group == job_b.ab_group
            assert (job_a.queue, job_b.queue) == (f"tm.{FAMILY}@q4_1+stub", f"tm.{FAMILY}@q8_0+stub")
            assert job_a.total_rows == job_b.total_rows == 5

        procs.start(settings, "scheduler", name="scheduler")
        start_stub_worker(procs, settings, "wa", "--model", f"{FAMILY}:q4_1")
        start_stub_worker(procs, settings, "wb", "--model", f"{FAMILY}:q8_0")
        assert wait_job(store, job_a.id, procs) == "completed"
        assert wait_job(store, job_b.id, procs) == "completed"

        with store.session() as s:
            queues = {w.name: (w.variant, set(w.queues)) for w in s.scalars(select(Worker))}
            served = {
                job_id: set(s.execute(select(Result.variant, Result.worker_id).where(Result.job_id == job_id)).all())
                for job_id in ids
            }
    finally:
        store.dispose()
    assert queues["wb"] == (f"{FAMILY}:q8_0+stub", {f"tm.{FAMILY}+stub", f"tm.{FAMILY}@q8_0+stub"})
    assert queues["wa"] == (f"{FAMILY}:q4_1+stub", {f"tm.{FAMILY}+stub", f"tm.{FAMILY}@q4_1+stub"})
    assert {(v, str(w).split(":")[0]) for v, w in served[ids[0]]} == {(f"{FAMILY}:q4_1+stub", "wa")}
    assert {(v, str(w).split(":")[0]) for v, w in served[ids[1]]} == {(f"{FAMILY}:q8_0+stub", "wb")}

    for job_id, quant in zip(ids, ("q4_1", "q8_0"), strict=True):
        out = tmp_path / f"{quant}.jsonl"
        exported = run_cli(settings, "results", job_id, "-o", str(out), timeout=60)
        assert exported.returncode == 0, exported.stderr
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert [line["custom_id"] for line in lines] == [f"r{i}" for i in range(5)]
        assert {line["tokenmill"]["model"] for line in lines} == {f"{FAMILY}:{quant}+stub"}
        assert {line["response"]["body"]["model"] for line in lines} == {f"{FAMILY}:{quant}+stub"}
        status = run_cli(settings, "status", job_id, "--json", timeout=60)
        assert json.loads(status.stdout)["model"] == f"{FAMILY}:{quant}"

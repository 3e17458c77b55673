"""A fleet on the real local Redis and Postgres: scheduler + several `tokenmill worker` processes."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.conftest import STUB_ARGS, STUB_ENV, WORKER_ENV, Procs, run_cli, wait_for
from tokenmill.config import Settings
from tokenmill.store import Store
from tokenmill.store.tables import Result, Worker


def dataset(path: Path, n: int, max_tokens: int = 8) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"q{i}", "messages": [{"role": "user", "content": f"Give one word for {i}."}],
                                 "max_tokens": max_tokens, "temperature": 0}) + "\n")  # fmt: skip
    return path


def submit(settings: Settings, path: Path, *args: str, stub: bool = True) -> str:
    """`tokenmill submit` for the stub workers most tests here start (the engine is part of the job's queue)."""
    proc = run_cli(settings, "submit", str(path), *args, env=STUB_ENV if stub else None)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def results_by_worker(settings: Settings, job: str) -> Counter[str]:
    store = Store(settings.database_url)
    try:
        with store.session() as s:
            rows = s.execute(
                select(Result.worker_id, func.count()).where(Result.job_id == job).group_by(Result.worker_id)
            )
            return Counter({str(w).split(":")[0]: n for w, n in rows})
    finally:
        store.dispose()


def exactly_once(settings: Settings, job: str) -> tuple[int, int]:
    store = Store(settings.database_url)
    try:
        with store.session() as s:
            n, distinct = s.execute(
                select(func.count(), func.count(func.distinct(Result.seq))).where(Result.job_id == job)
            ).one()
            return int(n), int(distinct)
    finally:
        store.dispose()


@pytest.mark.model
@pytest.mark.timeout(420)
def test_two_real_workers_share_one_job(
    tmp_path: Path, fleet_settings: Settings, procs: Procs, smollm2_path: Path
) -> None:
    procs.start(fleet_settings, "scheduler", name="scheduler")
    for name in ("wa", "wb"):
        procs.start(
            fleet_settings, "worker", "--name", name, "--threads", "1", "--n-seq", "4", env=WORKER_ENV, name=name
        )
    job = submit(fleet_settings, dataset(tmp_path / "d.jsonl", 24), "--chunk-size", "2", stub=False)
    status = run_cli(fleet_settings, "status", job, "--wait", "--json", timeout=360)
    assert status.returncode == 0, status.stderr + procs.logs()
    info = json.loads(status.stdout)
    assert (info["state"], info["succeeded"], info["failed"]) == ("completed", 24, 0)
    per_worker = results_by_worker(fleet_settings, job)
    assert set(per_worker) == {"wa", "wb"} and sum(per_worker.values()) == 24, per_worker
    assert exactly_once(fleet_settings, job) == (24, 24)
    out = tmp_path / "out.jsonl"
    assert run_cli(fleet_settings, "results", job, "-o", str(out)).returncode == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["custom_id"] for line in lines] == [f"q{i}" for i in range(24)]
    assert {line["tokenmill"]["model"] for line in lines} == {"smollm2-135m-instruct:q4_1"}


@pytest.mark.timeout(180)
def test_a_worker_started_mid_job_takes_chunks(tmp_path: Path, fleet_settings: Settings, procs: Procs) -> None:
    env = {**WORKER_ENV, "TOKENMILL_STUB_DELAY": "0.15"}
    procs.start(fleet_settings, "scheduler", name="scheduler")
    procs.start(fleet_settings, "worker", *STUB_ARGS, "--name", "early", env=env, name="early")
    job = submit(fleet_settings, dataset(tmp_path / "d.jsonl", 90), "--chunk-size", "3")
    wait_for(lambda: sum(results_by_worker(fleet_settings, job).values()) >= 6, 60, "first results", procs)
    procs.start(fleet_settings, "worker", *STUB_ARGS, "--name", "late", env=env, name="late")
    status = run_cli(fleet_settings, "status", job, "--wait", "--json", timeout=150)
    assert status.returncode == 0, status.stderr + procs.logs()
    per_worker = results_by_worker(fleet_settings, job)
    assert per_worker["late"] >= 6, per_worker  # it joined while work remained and took a real share
    assert exactly_once(fleet_settings, job) == (90, 90)


@pytest.mark.timeout(180)
def test_two_jobs_share_the_fleet(tmp_path: Path, fleet_settings: Settings, procs: Procs) -> None:
    env = {**WORKER_ENV, "TOKENMILL_STUB_DELAY": "0.05"}
    first = submit(fleet_settings, dataset(tmp_path / "a.jsonl", 60), "--chunk-size", "2")
    second = submit(fleet_settings, dataset(tmp_path / "b.jsonl", 60, max_tokens=9), "--chunk-size", "2")
    procs.start(fleet_settings, "scheduler", name="scheduler")
    procs.start(fleet_settings, "worker", *STUB_ARGS, "--name", "only", env=env, name="only")
    for job in (first, second):
        assert run_cli(fleet_settings, "status", job, "--wait", timeout=150).returncode == 0, procs.logs()
    store = Store(fleet_settings.database_url)
    with store.session() as s:
        span = {
            job: s.execute(
                select(func.min(Result.created_at), func.max(Result.created_at)).where(Result.job_id == job)
            ).one()
            for job in (first, second)
        }
    store.dispose()
    # Round-robin dispatch: the later job starts long before the earlier one ends.
    assert span[second][0] < span[first][1] - 1.0, span


@pytest.mark.timeout(120)
def test_workers_register_capacity_and_show_lost(tmp_path: Path, fleet_settings: Settings, procs: Procs) -> None:
    worker = procs.start(fleet_settings, "worker", *STUB_ARGS, "--name", "probe", env=WORKER_ENV, name="probe")

    def listed() -> list[dict[str, object]]:
        proc = run_cli(fleet_settings, "workers", "--json")
        assert proc.returncode == 0, proc.stderr
        return [w for w in json.loads(proc.stdout) if str(w["id"]).startswith("probe:")]

    wait_for(lambda: any(w["state"] == "ready" for w in listed()), 60, "worker ready", procs)
    (w,) = listed()
    assert w["variant"] == "smollm2-135m-instruct:q4_1+stub" and w["device"] == "cpu"
    assert isinstance(w["cores"], int) and w["cores"] >= 1 and w["ram_total"]
    os.killpg(worker.pid, signal.SIGKILL)
    lost_after = fleet_settings.lost_after
    time.sleep(lost_after + 1.5)
    assert listed()[0]["state"] == "lost"
    store = Store(fleet_settings.database_url)
    with store.session() as s:
        assert s.scalar(select(Worker.state).where(Worker.name == "probe")) in ("ready", "busy")
    store.dispose()


@pytest.mark.timeout(120)
def test_concurrency_starts_processes_that_split_the_cores(fleet_settings: Settings, procs: Procs) -> None:
    import psutil

    procs.start(fleet_settings, "worker", *STUB_ARGS, "--concurrency", "2", "--name", "pair", env=WORKER_ENV)

    def pair() -> list[dict[str, object]]:
        proc = run_cli(fleet_settings, "workers", "--json")
        return [w for w in json.loads(proc.stdout) if str(w["id"]).startswith("pair:") and w["state"] == "ready"]

    wait_for(lambda: len(pair()) == 2, 60, "two worker processes", procs)
    workers = pair()
    cores = psutil.cpu_count(logical=False) or 1
    assert len({w["pid"] for w in workers}) == 2
    assert sum(int(str(w["threads"])) for w in workers) <= max(2, cores)  # never more threads than cores

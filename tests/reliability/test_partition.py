"""A worker cut off from Postgres, then from Redis, for 30 s: it keeps its engine, it writes nothing for a
chunk it lost, it rejoins when the path heals, and every row is answered exactly once (issue 11, 17).

Two real workers on the real model share the module: W1 reaches both services through a
:class:`~tests.reliability.proxy.PausableProxy` (the path held silent, as dropped packets leave it),
W2 directly. Each cut is armed to fall at the worst moment, so the test does not depend on luck: the
store's path dies just after W1's INSERT of results reached the server (its transaction open, holding
the rows' unique keys, its COMMIT never sent); the broker's path dies just as Redis hands W1 a message
(Redis has popped it, W1 never hears of it).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import PG_ADMIN_URL, REDIS_HOST, REDIS_PORT, Procs, need, port_open
from tests.reliability.conftest import Stack, wait_for, write_dataset
from tests.reliability.proxy import PausableProxy
from tokenmill.config import Settings

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.model, pytest.mark.slow]

CUT_FOR = 30.0
REAL = ("--n-seq", "1")  # one row at a time: a chunk is half done for most of its run


@dataclass
class Partitioned:
    stack: Stack
    db: PausableProxy
    broker: PausableProxy
    w1: subprocess.Popen[bytes]
    w1_id: str
    w2_id: str

    def worker_ids(self) -> list[str]:
        return [str(i) for (i,) in self.stack.query("SELECT id FROM workers ORDER BY name")]

    def owner_of(self, chunk_id: int) -> tuple[str | None, str]:
        owner, state = self.stack.query("SELECT lease_owner, state FROM chunks WHERE id = :c", c=chunk_id)[0]
        return owner, str(state)

    def chunk_results(self, chunk_id: int) -> dict[int, str]:
        rows = self.stack.query(
            "SELECT r.seq, r.worker_id FROM results r JOIN chunks c ON r.job_id = c.job_id"
            " AND r.seq BETWEEN c.first_seq AND c.last_seq WHERE c.id = :c",
            c=chunk_id,
        )
        return {int(seq): str(worker) for seq, worker in rows}

    def heartbeat_age(self, worker_id: str) -> float:
        return float(
            self.stack.query(
                "SELECT extract(epoch from statement_timestamp()) - heartbeat_at FROM workers WHERE id = :w",
                w=worker_id,
            )[0][0]
        )

    def assert_w1_alive_and_unchanged(self) -> None:
        assert self.w1.poll() is None, self.stack.logs()
        assert self.worker_ids() == [self.w1_id, self.w2_id]  # no restart, no second registration
        assert self.w1_id.split(":")[1] == str(self.w1.pid)

    def assert_rejoined(self, tag: str) -> None:
        """After the heal W1 heartbeats again and takes, and completes, chunks of a new job."""
        wait_for(lambda: self.heartbeat_age(self.w1_id) < 3, 30, "W1 to heartbeat again", self.stack.logs)
        job = self.stack.submit(write_dataset(self.stack.tmp / f"{tag}.jsonl", 12, max_tokens=4), "--chunk-size", "2",
                                stub=False)
        self.stack.wait_state(job, timeout=120)
        assert_exactly_once(self.stack, job, 12)
        assert self.stack.stored_by(job, "w1"), "W1 took no chunk after the path healed\n" + self.stack.logs()


def assert_exactly_once(stack: Stack, job: str, n: int) -> None:
    counts = stack.counts(job)
    assert (counts.expected, counts.stored, counts.duplicated) == (n, n, 0), counts
    statuses = stack.query("SELECT DISTINCT status FROM results WHERE job_id = :j", j=job)
    assert [s for (s,) in statuses] == ["succeeded"]
    ids = [c for (c,) in stack.query("SELECT custom_id FROM results WHERE job_id = :j", j=job)]
    assert sorted(ids) == sorted(f"r{i}" for i in range(n))


@pytest.fixture(scope="module")
def partitioned(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, smollm2_path: Path
) -> Iterator[Partitioned]:
    """Postgres, Redis, a scheduler, W1 behind the proxies and W2 direct, for the whole module."""
    need(port_open("127.0.0.1", 5432), "PostgreSQL on 127.0.0.1:5432")
    need(port_open(REDIS_HOST, REDIS_PORT), "Redis on 127.0.0.1:6379")
    import psycopg
    import redis

    tmp = tmp_path_factory.mktemp("partition")
    name = f"tm_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    redis_db = 1 + (os.getpid() % 14)
    redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=redis_db).flushdb()
    pg_base = PG_ADMIN_URL.rsplit("/", 1)[0]
    settings = Settings(
        data_dir=tmp / ".tokenmill",
        models_dir=models_dir,
        database_url=f"{pg_base}/{name}",
        broker_url=f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}",
        lease_seconds=5.0,
        heartbeat_seconds=1.0,  # lost_after: 10 s
        dispatch_interval=0.2,
    )
    procs = Procs(tmp / "logs")
    stack = Stack(settings, procs, tmp)
    db, broker = PausableProxy(("127.0.0.1", 5432)), PausableProxy((REDIS_HOST, REDIS_PORT))
    try:
        stack.scheduler()
        through_proxies = {
            "TOKENMILL_DATABASE_URL": f"{pg_base.rsplit(':', 1)[0]}:{db.port}/{name}",
            "TOKENMILL_BROKER_URL": f"redis://127.0.0.1:{broker.port}/{redis_db}",
            # W1 takes one chunk per message, so it asks the broker for work at every chunk boundary (a
            # chaining worker would take the job's chunks from the store and never fetch the message the
            # broker cut is aimed at); W2 chains, as workers do by default.
            "TOKENMILL_CHAIN_CHUNKS": "0",
        }
        w1 = stack.worker(*REAL, name="w1", stub=False, env=through_proxies)
        stack.worker(*REAL, name="w2", stub=False)
        ready = "SELECT id FROM workers WHERE state = 'ready' ORDER BY name"
        ids = wait_for(
            lambda: len(stack.query(ready)) == 2 and stack.query(ready), 120, "two ready workers", stack.logs
        )
        yield Partitioned(stack, db, broker, w1, str(ids[0][0]), str(ids[1][0]))
    finally:
        db.resume()
        broker.resume()
        procs.stop_all()
        stack.close()
        db.close()
        broker.close()
        redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=redis_db).flushdb()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.timeout(240)
def test_worker_cut_off_from_the_store_mid_write_lets_its_lease_lapse_and_rejoins(partitioned: Partitioned) -> None:
    p, stack = partitioned, partitioned.stack
    n = 32
    job = stack.submit(write_dataset(stack.tmp / "db.jsonl", n, max_tokens=8), "--chunk-size", "8", stub=False)
    wait_for(lambda: stack.running_chunk_of("w1", 1), 120, "W1 inside a chunk", stack.logs)
    # The next results INSERT of W1 reaches Postgres, then the path goes silent: its COMMIT never comes.
    p.db.pause_on(b"tokens_per_second", direction="to_server", deliver=True)
    assert p.db.paused.wait(60), "W1 wrote no results\n" + stack.logs()
    cut_at = time.monotonic()
    (lost,) = [int(c) for (c,) in stack.query("SELECT id FROM chunks WHERE lease_owner = :w", w=p.w1_id)]
    committed_before = {seq for seq, w in p.chunk_results(lost).items() if w == p.w1_id}
    # W1's lease lapses; the dispatcher reopens the chunk and W2 takes it over and finishes it, W1 still cut
    # off: the server rolled back W1's open transaction, whose unique keys would hold W2's INSERT till the heal.
    wait_for(lambda: p.owner_of(lost)[0] == p.w2_id or p.owner_of(lost)[1] == "done", CUT_FOR - 1, "W2 to take over")
    taken_after = time.monotonic() - cut_at
    wait_for(lambda: p.owner_of(lost)[1] == "done", CUT_FOR - taken_after, "W2 to finish the chunk", stack.logs)
    done_after = time.monotonic() - cut_at
    assert p.db.paused.is_set()
    time.sleep(max(0.0, CUT_FOR - (time.monotonic() - cut_at)))
    p.db.resume()
    stack.wait_state(job, timeout=120)
    print(
        f"\nstore cut {CUT_FOR:.0f}s mid-INSERT: W2 took chunk {lost} over {taken_after:.1f}s and finished it"
        f" {done_after:.1f}s in; W1 had stored {len(committed_before)} of its rows; {stack.counts(job)}"
    )
    w1_log = "".join(f.read_text(errors="replace") for f in stack.procs.logdir.glob("w1-*.log"))
    print("W1 logged:", *sorted({line.strip()[:150] for line in w1_log.splitlines() if "WARNING" in line}), sep="\n  ")

    assert_exactly_once(stack, job, n)
    # Nothing of the lost chunk is W1's but what it had committed before the cut: its open transaction
    # was rolled back by the server, and after the heal it stored no row of a chunk it no longer held.
    late = {seq for seq, w in p.chunk_results(lost).items() if w == p.w1_id} - committed_before
    assert not late, f"W1 stored rows {sorted(late)} of chunk {lost} after losing its lease\n{stack.logs()}"
    assert set(p.chunk_results(lost).values()) <= {p.w1_id, p.w2_id}
    (rows_done,) = stack.query("SELECT rows_done FROM workers WHERE id = :w", w=p.w1_id)[0]
    assert rows_done == int(stack.query("SELECT count(*) FROM results WHERE worker_id = :w", w=p.w1_id)[0][0])
    p.assert_w1_alive_and_unchanged()
    p.assert_rejoined("db-after")


@pytest.mark.timeout(240)
def test_worker_cut_off_from_the_broker_as_it_is_handed_a_message_rejoins(partitioned: Partitioned) -> None:
    p, stack = partitioned, partitioned.stack
    n = 32
    job = stack.submit(write_dataset(stack.tmp / "broker.jsonl", n, max_tokens=8), "--chunk-size", "4", stub=False)
    wait_for(lambda: stack.running_chunk_of("w1", 1), 120, "W1 inside a chunk", stack.logs)
    # W1 finishes that chunk (the store is reachable: its lease holds) and asks Redis for the next message;
    # Redis pops it and answers, and the answer is what the partition swallows.
    p.broker.pause_on(b"tokenmill.process_chunk", direction="to_client", deliver=False)
    assert p.broker.paused.wait(60), "W1 was handed no message\n" + stack.logs()
    cut_at = time.monotonic()
    # The job does not wait for W1: W2 answers every chunk, the swallowed one included (the dispatcher
    # sends it again once the broker holds no message for it).
    stack.wait_state(job, timeout=CUT_FOR - 1)
    print(f"\nbroker cut {CUT_FOR:.0f}s as W1 was handed a message: job done {time.monotonic() - cut_at:.1f}s into it")
    assert_exactly_once(stack, job, n)
    p.assert_w1_alive_and_unchanged()
    assert p.heartbeat_age(p.w1_id) < 3  # the store still hears W1: cut from the broker only
    time.sleep(max(0.0, CUT_FOR - (time.monotonic() - cut_at)))
    p.broker.resume()
    # W1 now hears of the swallowed message: a chunk already done, which it must not answer again.
    p.assert_rejoined("broker-after")
    assert_exactly_once(stack, job, n)
    p.assert_w1_alive_and_unchanged()

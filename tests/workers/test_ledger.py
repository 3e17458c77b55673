"""The task's chunk ledger: a row leaves its chunk only once committed, and adoption is idempotent."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tests.workers.test_runtime_claims import ScriptedEngine, chunk_ids, make_job, results, runtime
from tokenmill.config import Settings
from tokenmill.store import Store
from tokenmill.store import jobs as store_jobs
from tokenmill.store import results as store_results
from tokenmill.store.tables import Chunk
from tokenmill.workers.ledger import Ledger


def test_adoption_is_idempotent_and_a_chunk_finishes_only_with_its_last_committed_row() -> None:
    ledger = Ledger("j", 1)
    assert ledger.held() == [1]
    assert ledger.adopt(1, [0, 1, 2]) == [0, 1, 2]
    assert ledger.adopt(1, [1, 2, 3]) == [3]  # taken back after a lapse: only the row it did not have
    assert ledger.finishing([0, 1]) == []  # rows 2 and 3 are still out
    ledger.stored([0, 1], [])
    assert ledger.finishing([2, 3]) == [1]
    assert ledger.held() == []  # being completed: not renewed (a failed renewal is not a lost lease)
    ledger.reopen([1])  # that commit failed
    assert ledger.held() == [1] and ledger.outstanding() == 2
    assert ledger.finishing([2, 3]) == [1]
    ledger.stored([2, 3], [1])
    assert ledger.held() == [] and ledger.outstanding() == 0


def test_a_chunk_adopted_with_nothing_to_do_is_closed_by_the_writer() -> None:
    ledger = Ledger("j", 5)
    ledger.hold(6)
    ledger.adopt(5, [])
    assert ledger.empty_chunks() == [5]
    assert ledger.held() == [6]  # 6 was claimed ahead and never read: still held, handed back at the end


def test_a_batch_that_fails_to_commit_leaves_its_chunk_open_and_the_next_claim_answers_it(
    store: Store, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings.with_(result_batch_rows=1, result_batch_ms=0.0, chain_chunks=False)
    job = make_job(store, 4, 4)
    (chunk,) = chunk_ids(store, job)
    real = store_results.write_results
    calls = {"n": 0}

    def flaky(s: Session, rows: Sequence[dict[str, Any]]) -> set[tuple[str, int]]:
        calls["n"] += 1
        if calls["n"] == 2:  # one commit fails for good (a deadlock, a lock timeout), later ones succeed
            raise IntegrityError("INSERT", {}, Exception("injected"))
        return real(s, rows)

    monkeypatch.setattr(store_results, "write_results", flaky)
    rt = runtime(store, settings, ScriptedEngine())
    assert rt.process_chunk(job, chunk).generated == 4
    assert [r.custom_id for r in results(store, job)] == ["r0", "r2", "r3"]
    with store.session() as s:
        c = s.get(Chunk, chunk)
        assert c is not None and c.state == "pending"  # not done with a row in neither file
        assert store_jobs.state_of(s, job) == "running"
    engine = ScriptedEngine()
    rt2 = runtime(store, settings, engine, "w2")
    assert rt2.process_chunk(job, chunk).generated == 1
    assert dict(engine.tries) == {"r1": 1}  # exactly the missing row
    assert [r.custom_id for r in results(store, job)] == ["r0", "r1", "r2", "r3"]
    with store.session() as s:
        assert s.scalar(select(Chunk.state).where(Chunk.id == chunk)) == "done"
        assert store_jobs.state_of(s, job) == "completed"
    rt.close()
    rt2.close()

"""The dispatcher's own recovery paths, in process: a send that fails, a broker that lost its data."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from tokenmill.config import Settings
from tokenmill.datasets import COMPLETIONS, DatasetRow, SamplingParams
from tokenmill.scheduler.dispatch import BrokerWatch, Dispatcher
from tokenmill.scheduler.submit import submit_rows
from tokenmill.store import Store
from tokenmill.store.tables import Chunk


class DeadBroker:
    """A Celery app whose every send fails, as with Redis down."""

    sent = 0

    def send_task(self, *args: Any, **kwargs: Any) -> None:
        raise ConnectionError("broker down")


def _job(store: Store, rows: int = 10, chunk_size: int = 2) -> str:
    data = [DatasetRow(i + 1, f"r{i}", COMPLETIONS, prompt=f"p{i}", params=SamplingParams()) for i in range(rows)]
    return submit_rows(store, data, name="t", key="k", family="fam", pinned_quant=None, chunk_size=chunk_size)


def _states(store: Store, job: str) -> list[str]:
    with store.session() as s:
        return sorted(c.state for c in s.query(Chunk).filter(Chunk.job_id == job))


def test_chunks_marked_queued_but_not_sent_go_back_to_pending(settings: Settings, store: Store) -> None:
    job = _job(store)
    dispatcher = Dispatcher(store, DeadBroker(), settings)
    with pytest.raises(ConnectionError):
        dispatcher.tick()
    # Nothing reached the broker, so nothing may wait as "queued" for the minutes-long stale requeue.
    assert _states(store, job) == ["pending"] * 5


def test_requeue_seconds_is_a_setting_handed_to_children() -> None:
    assert Settings().requeue_after == 240.0  # max(4 x 60 s lease, 120 s)
    s = Settings.from_env({"TOKENMILL_REQUEUE_SECONDS": "15"})
    assert s.requeue_after == 15.0 and s.as_env()["TOKENMILL_REQUEUE_SECONDS"] == "15.0"
    assert Settings.from_env(s.as_env()).requeue_seconds == 15.0
    assert "TOKENMILL_REQUEUE_SECONDS" not in Settings().as_env()


def test_broker_watch_notices_an_emptied_redis(redis_url: str) -> None:
    watch = BrokerWatch(redis_url, "postgresql://db/a")
    other = BrokerWatch(redis_url, "postgresql://db/b")  # another deployment on the same Redis database
    try:
        assert watch.lost_messages()  # first look: no marker (a fresh broker; nothing can be queued yet)
        assert not watch.lost_messages()
        assert not BrokerWatch(redis_url, "postgresql://db/a").lost_messages()  # a second scheduler: once only
        assert other.lost_messages()
        redis.Redis.from_url(redis_url).flushdb()  # what a restart without persistence amounts to
        assert watch.lost_messages() and other.lost_messages()
        assert not watch.lost_messages()
    finally:
        for w in (watch, other):
            if w._client is not None:
                w._client.close()
    assert not BrokerWatch("sqla+sqlite:///x.db", "sqlite:///y.db").lost_messages()  # persistent: not watched
    assert not BrokerWatch("redis://127.0.0.1:1/0", "sqlite:///y.db").lost_messages()  # unreachable: no verdict

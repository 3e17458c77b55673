"""The dispatcher's own recovery paths, in process: a send that fails, a broker that lost its data."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import redis
from sqlalchemy import update

from tokenmill.celery_app import make_app, queue_for
from tokenmill.config import Settings
from tokenmill.rows import COMPLETIONS, DatasetRow, SamplingParams
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


# A consumer that takes every waiting message without acking it, then dies as under kill -9: no clean
# shutdown hands its messages back.
TAKE_AND_DIE = """
import os, signal, sys
from kombu import Connection
with Connection(sys.argv[1]) as conn:
    taken = 0
    while conn.default_channel.basic_get(sys.argv[2], no_ack=False) is not None:
        taken += 1
    print(taken, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _depth(app: Any, queue: str) -> int:
    with app.connection_for_write() as conn:
        return int(conn.default_channel.queue_declare(queue=queue, durable=True, auto_delete=False)[1])


def _age_queued(store: Store, seconds: float) -> None:
    with store.session() as s:
        s.execute(update(Chunk).where(Chunk.state == "queued").values(enqueued_at=Chunk.enqueued_at - seconds))


@pytest.mark.parametrize("broker", ["redis", "sql"])
def test_chunks_whose_message_died_with_a_worker_are_sent_again(
    settings: Settings, store: Store, broker: str, request: pytest.FixtureRequest
) -> None:
    """A worker killed between taking a message and claiming its chunk: the message sits unacked in Redis
    for an hour (in kombu's SQL transport, forever). Once the queue is drained the chunk is sent again
    after ``lost_after``, not after the minutes of the stale requeue."""
    if broker == "redis":
        settings = settings.with_(broker_url=request.getfixturevalue("redis_url"))
    app = make_app(settings)
    queue = queue_for("fam")
    job = _job(store, rows=4, chunk_size=2)
    dispatcher = Dispatcher(store, app, settings)
    try:
        assert dispatcher.tick() == 2
        taker = subprocess.run(
            [sys.executable, "-c", TAKE_AND_DIE, settings.broker_url, queue], capture_output=True, text=True, timeout=60
        )
        assert taker.returncode == -9 and taker.stdout.strip() == "2", taker.stderr
        assert _depth(app, queue) == 0 and _states(store, job) == ["queued", "queued"]
        assert dispatcher.tick() == 0  # just queued: a worker may be about to claim them

        _age_queued(store, dispatcher.lost_after + 1)
        assert dispatcher.lost_after + 1 < settings.requeue_after  # not the stale requeue at work
        assert dispatcher.tick() == 2
        assert _depth(app, queue) == 2 and _states(store, job) == ["queued", "queued"]

        # Messages still waiting in the broker are not lost, however long they wait: nothing is resent.
        dispatcher._next_orphan_check = 0.0
        _age_queued(store, dispatcher.lost_after + 1)
        assert dispatcher.tick() == 0
        assert _depth(app, queue) == 2
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(queue)
        app.close()


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


class CountingDispatcher(Dispatcher):
    """Counts its passes; ``busy`` passes report a chunk sent."""

    def __init__(self, *args: Any, busy: int = 0) -> None:
        super().__init__(*args)
        self.passes = 0
        self.busy = busy

    def tick(self) -> int:
        self.passes += 1
        return 1 if self.passes <= self.busy else 0


def _passes_in(dispatcher: CountingDispatcher, seconds: float) -> int:
    stop = threading.Event()
    loop = threading.Thread(target=dispatcher.run, args=(stop,), daemon=True)
    loop.start()
    stop.wait(seconds)
    stop.set()
    loop.join(5)
    return dispatcher.passes


def test_an_idle_dispatcher_looks_less_often_and_a_busy_one_at_its_interval(settings: Settings, store: Store) -> None:
    settings = settings.with_(dispatch_interval=0.1)
    # idle: waits 0.2, 0.4, 0.4 ... (capped at 4 intervals) instead of 0.1 each: about 4 passes in 1.2 s, not 12
    idle = _passes_in(CountingDispatcher(store, DeadBroker(), settings), 1.2)
    busy = _passes_in(CountingDispatcher(store, DeadBroker(), settings, busy=1000), 1.2)
    assert 2 <= idle <= 6
    assert busy >= 8


class FlakyBroker:
    """A Celery app whose sends fail with an answer nobody expected (Redis out of memory), until healed."""

    def __init__(self) -> None:
        self.healed = threading.Event()
        self.sent: list[Any] = []

    def send_task(self, *args: Any, **kwargs: Any) -> None:
        if not self.healed.is_set():
            raise redis.exceptions.ResponseError("OOM command not allowed when used memory > 'maxmemory'.")
        self.sent.append(args)


def test_the_dispatcher_survives_an_unexpected_error_and_shows_it_failing(settings: Settings, store: Store) -> None:
    from tokenmill.store import schedulers as store_schedulers

    settings = settings.with_(dispatch_interval=0.05, heartbeat_seconds=0.2)
    job = _job(store, rows=4, chunk_size=2)
    broker = FlakyBroker()
    dispatcher = Dispatcher(store, broker, settings)
    stop = threading.Event()
    loop = threading.Thread(target=dispatcher.run, args=(stop,), daemon=True)
    loop.start()
    try:
        deadline = time.monotonic() + 10
        while dispatcher.failing is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert loop.is_alive(), "the dispatcher died on an error it did not expect"
        with store.session() as s:
            (seen,) = store_schedulers.health(s, settings.lost_after)
        assert seen.alive and seen.failing_for is not None and "OOM" in (seen.error or "")
        assert _states(store, job) == ["pending", "pending"]  # nothing left marked queued but unsent
        broker.healed.set()
        while len(broker.sent) < 2 and time.monotonic() < deadline + 10:
            time.sleep(0.05)
        assert len(broker.sent) == 2 and dispatcher.failing is None
        time.sleep(0.3)
        with store.session() as s:
            (seen,) = store_schedulers.health(s, settings.lost_after)
        assert seen.failing_for is None and seen.error is None
    finally:
        stop.set()
        loop.join(10)
    with store.session() as s:
        assert store_schedulers.health(s, settings.lost_after) == []  # a clean stop takes its row away

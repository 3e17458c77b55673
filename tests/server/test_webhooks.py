"""Batch webhooks end to end with a local receiver: every final state sends one event, signed so the official
SDK's ``client.webhooks.unwrap`` accepts it; a receiver that is down gets every event once it is back, across
a sender restart; redirects are not followed; secrets and URLs stay out of the log. The batch driver and the
sender are stepped by hand (no model) but in the last test, which runs the real `serve` on the real model."""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from openai.types.webhooks import (
    BatchCancelledWebhookEvent,
    BatchCompletedWebhookEvent,
    BatchExpiredWebhookEvent,
    BatchFailedWebhookEvent,
)
from sqlalchemy import select, update

from tests.conftest import ADMIN_KEY, API_KEYS, InProcessServer, ServeProcess, free_port
from tests.server.helpers import (
    CHAT,
    answer_row,
    chat_line,
    client,
    complete_job,
    jsonl,
    running_batch,
    upload,
    wait_status,
)
from tests.server.receiver import Received, Receiver
from tokenmill.config import Settings, WebhookEndpoint
from tokenmill.server.auth import tenant_of
from tokenmill.server.driver import BatchDriver
from tokenmill.server.webhooks import LEASE_SECONDS, WebhookSender, backoff
from tokenmill.store import Store
from tokenmill.store import batches as store_batches
from tokenmill.store import webhooks as store_webhooks
from tokenmill.store.states import BatchStatus
from tokenmill.store.tables import ApiBatch, WebhookDelivery

KEY_A, KEY_B, KEY_C = API_KEYS
KINDS = {
    "batch.completed": BatchCompletedWebhookEvent,
    "batch.failed": BatchFailedWebhookEvent,
    "batch.expired": BatchExpiredWebhookEvent,
    "batch.cancelled": BatchCancelledWebhookEvent,
}


BatchEvent = (
    BatchCompletedWebhookEvent | BatchFailedWebhookEvent | BatchExpiredWebhookEvent | BatchCancelledWebhookEvent
)


def unwrap(c: openai.OpenAI, r: Received, key: str) -> BatchEvent:
    """The request as the SDK's ``webhooks.unwrap`` verifies and parses it: one of the four batch events."""
    event = c.webhooks.unwrap(r.body, r.headers, secret=key)
    assert isinstance(event, KINDS[event.type]) and event.object == "event", event
    assert isinstance(event, BatchEvent)
    return event


def secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def drain(store: Store, settings: Settings, timeout: float = 30) -> None:
    """Step a sender until nothing is due (every delivery settled or waiting out its backoff)."""
    sender = WebhookSender(store, settings)
    deadline = time.monotonic() + timeout
    while sender.tick():
        assert time.monotonic() < deadline


def settle(driver: BatchDriver, store: Store, passes: int = 20) -> None:
    """Tick until no batch is open: a pass validates or finalizes only a few batches (HEAVY_STEPS_PER_TICK)."""
    for _ in range(passes):
        driver.tick()
        with store.session() as s:
            if not store_batches.open_batches(s):
                return
    raise AssertionError(f"batches still open after {passes} driver passes")


def states(store: Store) -> dict[str, tuple[str, str]]:
    """batch id -> (event type, delivery state)."""
    with store.session() as s:
        rows = s.execute(select(WebhookDelivery.batch_id, WebhookDelivery.type, WebhookDelivery.state))
        return {str(b): (str(t), str(st)) for b, t, st in rows}


def failed_batch(c: openai.OpenAI) -> str:
    return c.batches.create(input_file_id=upload(c, b"not json\n"), endpoint=CHAT, completion_window="24h").id


def early_cancelled(c: openai.OpenAI) -> str:
    b = c.batches.create(input_file_id=upload(c, jsonl([chat_line(0)])), endpoint=CHAT, completion_window="24h")
    assert c.batches.cancel(b.id).status == "cancelled"
    return b.id


def test_every_final_state_sends_one_event_the_sdk_verifies(settings: Settings) -> None:
    ra, rb = Receiver(free_port()).start(), Receiver(free_port()).start()
    sa, sb = secret(), secret()
    hooks = (
        WebhookEndpoint(tenant_of(KEY_A), ra.url + "/a", sa),
        WebhookEndpoint(tenant_of(KEY_B), rb.url + "/b", sb, events=("batch.completed",)),
    )
    try:
        with InProcessServer(settings.with_(api_keys=API_KEYS, admin_keys=(ADMIN_KEY,), webhooks=hooks)) as server:
            drive = BatchDriver(server.store, server.settings)
            a, b, cc = (client(server.url + "/v1", k) for k in (KEY_A, KEY_B, KEY_C))
            want = {early_cancelled(a): "batch.cancelled", failed_batch(a): "batch.failed"}
            late, _ = running_batch(server, a, 2)
            a.batches.cancel(late)
            want[late] = "batch.cancelled"
            gone, _ = running_batch(server, a, 2)
            with server.store.session() as s:
                s.execute(update(ApiBatch).where(ApiBatch.id == gone).values(expires_at=time.time() - 1))
            want[gone] = "batch.expired"
            for owner_client in (a, b):
                done, job_id = running_batch(server, owner_client, 1)
                answer_row(server, job_id, 0)
                complete_job(server, job_id)
                if owner_client is a:
                    want[done] = "batch.completed"
                else:
                    b_done = done
            b_failed, c_failed = failed_batch(b), failed_batch(cc)
            settle(drive, server.store)
            assert {i: a.batches.retrieve(i).status for i in want} == {i: t[6:] for i, t in want.items()}
            drain(server.store, server.settings)

            got = ra.wait(len(want), 10)
            assert len(got) == len(want) and {r.path for r in got} == {"/a"}
            seen = {}
            for r in got:
                event = unwrap(a, r, sa)
                assert event.id == r.headers["webhook-id"] and event.id.startswith("evt_")
                assert abs(event.created_at - time.time()) < 120
                seen[event.data.id] = event.type
                with pytest.raises(openai.InvalidWebhookSignatureError):
                    a.webhooks.unwrap(r.body, r.headers, secret=sb)  # another tenant's secret does not verify
            assert seen == want
            (only_b,) = rb.wait(1, 10)
            assert rb.received() == [only_b]
            event = unwrap(b, only_b, sb)
            assert (event.type, event.data.id) == ("batch.completed", b_done)
            st = states(server.store)
            assert {i: st[i][1] for i in want} == dict.fromkeys(want, "delivered")
            assert st[b_failed] == ("batch.failed", "skipped") and st[c_failed] == ("batch.failed", "skipped")
            req = urllib.request.Request(server.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                metrics = resp.read().decode()
            assert 'tokenmill_webhook_deliveries{state="delivered"} 6.0' in metrics
            assert 'tokenmill_webhook_deliveries{state="skipped"} 2.0' in metrics
    finally:
        ra.stop()
        rb.stop()


@pytest.mark.timeout(120)
def test_a_receiver_down_for_a_while_gets_every_event_once_back_across_a_sender_restart(settings: Settings) -> None:
    down_for = 15.0
    port = free_port()
    sa = secret()
    keyed = settings.with_(
        api_keys=API_KEYS,
        webhooks=(WebhookEndpoint(tenant_of(KEY_A), f"http://127.0.0.1:{port}/hook", sa),),
        webhook_retry_seconds=0.5,
        webhook_retry_max_seconds=2.0,
    )
    receiver = Receiver(port)
    with InProcessServer(keyed) as server:
        c = client(server.url + "/v1", KEY_A)
        batches = {failed_batch(c), early_cancelled(c), early_cancelled(c)}
        BatchDriver(server.store, keyed).tick()
        down_since = time.monotonic()
        stop = threading.Event()
        first = WebhookSender(server.store, keyed)
        thread = threading.Thread(target=first.run, args=(stop, 0.1))
        thread.start()
        time.sleep(4)
        stop.set()  # the server stops: this sender is gone
        thread.join(timeout=15)
        with server.store.session() as s:
            rows = list(s.scalars(select(WebhookDelivery)))
            assert {r.batch_id for r in rows} == batches and all(r.state == "pending" for r in rows)
            assert all(r.attempts >= 2 for r in rows), [r.attempts for r in rows]
            assert all((r.last_error or "").startswith("no answer: ConnectionRefusedError") for r in rows)
            victim = rows[0].id
        with server.store.session() as s:  # and one died mid-attempt, holding a lease
            s.execute(update(WebhookDelivery).where(WebhookDelivery.id == victim).values(next_attempt_at=0))
            assert store_webhooks.claim(s, victim, "serve:dead-host:1", 3.0) is not None
        restarted = Store(keyed.database_url)  # a new process: its own store handle and sender identity
        stop = threading.Event()
        second = threading.Thread(target=WebhookSender(restarted, keyed).run, args=(stop, 0.1))
        second.start()
        try:
            time.sleep(max(0.0, down_since + down_for - time.monotonic()))
            receiver.start()
            got = receiver.wait(3, 15)
            time.sleep(1.0)  # anything sent twice would have arrived by now
            got = receiver.received()
        finally:
            stop.set()
            second.join(timeout=15)
            receiver.stop()
            restarted.dispose()
        events = [unwrap(c, r, sa) for r in got]
        assert sorted(e.data.id for e in events) == sorted(batches)  # every event, each once
        assert len({r.headers["webhook-id"] for r in got}) == 3
        assert set(states(server.store).values()) <= {("batch.failed", "delivered"), ("batch.cancelled", "delivered")}


def test_redirects_are_not_followed_and_an_old_event_is_given_up_without_leaking_secrets(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    elsewhere = Receiver(free_port()).start()
    redirecting = Receiver(free_port(), status=307, location=elsewhere.url + "/internal").start()
    sa = secret()
    endpoint = WebhookEndpoint(tenant_of(KEY_A), redirecting.url + "/hook/path-token-9f3e?sig=q-token-77", sa)
    keyed = settings.with_(api_keys=API_KEYS, webhooks=(endpoint,), webhook_max_age_seconds=1.0)
    assert sa not in repr(keyed) and "path-token" not in repr(keyed)
    try:
        caplog.set_level(logging.DEBUG)
        with InProcessServer(keyed) as server:
            c = client(server.url + "/v1", KEY_A)
            batch_id = failed_batch(c)
            BatchDriver(server.store, keyed).tick()
            drain(server.store, keyed)
            assert len(redirecting.received()) == 1 and elsewhere.received() == []
            with server.store.session() as s:
                (d,) = s.scalars(select(WebhookDelivery))
                assert (d.batch_id, d.state, d.attempts, d.last_error) == (batch_id, "failed", 1, "HTTP 307")
        text = caplog.text
        assert "giving up" in text
        for leak in (sa, sa[6:], "path-token-9f3e", "q-token-77", redirecting.url):
            assert leak not in text
    finally:
        redirecting.stop()
        elsewhere.stop()


def test_two_senders_share_the_queue_without_sending_twice(any_store: Store, settings: Settings) -> None:
    """Two replicas' senders, running at once over one store: every event reaches the receiver, once."""
    receiver = Receiver(free_port()).start()
    owner = tenant_of(KEY_A)
    keyed = settings.with_(webhooks=(WebhookEndpoint(owner, receiver.url, secret()),))
    ids = []
    for _ in range(40):
        with any_store.session() as s:
            b = store_batches.create_batch(s, owner=owner, endpoint=CHAT, input_file_id="file-x",
                                           completion_window="24h", metadata=None, idempotency_key=None)  # fmt: skip
            assert store_batches.request_cancel(s, b.id).status == BatchStatus.CANCELLED
            ids.append(b.id)
    stop = threading.Event()
    threads = [threading.Thread(target=WebhookSender(any_store, keyed).run, args=(stop, 0.05)) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        receiver.wait(40, 30)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
        receiver.stop()
    got = [r.headers["webhook-id"] for r in receiver.received()]
    assert len(got) == len(set(got)) == 40


def test_backoff_doubles_to_its_cap_with_jitter() -> None:
    import random

    rng = random.Random(7)
    delays = [backoff(n, 5.0, 60.0, rng) for n in range(1, 9)]
    bases = [5, 10, 20, 40, 60, 60, 60, 60]
    assert all(0.8 * b <= d <= 1.2 * b for d, b in zip(delays, bases, strict=True))


@pytest.mark.model
@pytest.mark.timeout(300)
def test_real_serve_restarted_while_the_receiver_is_down_loses_no_event(
    tmp_path: Path, smollm2_path: Path, models_dir: Path
) -> None:
    """`tokenmill serve` on the real model, configured from the environment: a batch completes, one fails and
    one is cancelled while the receiver is down; the server is killed (-9) and started again; the receiver
    comes back after about 15 s and gets all three events, each verified by the SDK (one whose attempt the kill
    cut short, now and then, only once that attempt's lease has run out)."""
    port, sa = free_port(), secret()
    env = {
        "TOKENMILL_WEBHOOKS": json.dumps({tenant_of(KEY_A): {"url": f"http://127.0.0.1:{port}/in", "secret": sa}}),
        "TOKENMILL_WEBHOOK_RETRY_SECONDS": "0.5",
        "TOKENMILL_WEBHOOK_RETRY_MAX_SECONDS": "2",
    }
    receiver = Receiver(port)
    first = ServeProcess(tmp_path / ".tokenmill", models_dir, env=env).start()
    second: ServeProcess | None = None
    try:
        c = client(first.base_url, KEY_A)
        fid = upload(c, jsonl([chat_line(i, max_tokens=4) for i in range(2)]))
        done = c.batches.create(input_file_id=fid, endpoint=CHAT, completion_window="24h").id
        want = {failed_batch(c): "batch.failed", early_cancelled(c): "batch.cancelled", done: "batch.completed"}
        down_since = time.monotonic()
        assert wait_status(c, done, ("completed", "failed", "expired", "cancelled"), 180).status == "completed"
        wait_status(c, next(iter(want)), ("failed",), 30)
        time.sleep(2)  # a few refused attempts each
        first.kill9()
        second = ServeProcess(tmp_path / ".tokenmill", models_dir, env=env).start()
        time.sleep(max(0.0, down_since + 15 - time.monotonic()))
        receiver.start()
        receiver.wait(3, LEASE_SECONDS + 30)  # an attempt the kill cut short is retried once its lease runs out
        time.sleep(1.0)
        got = receiver.received()
    finally:
        receiver.stop()
        first.stop()
        if second is not None:
            second.stop()
    events = [unwrap(c, r, sa) for r in got]
    assert {e.data.id: e.type for e in events} == want and len(events) == 3
    logs = "".join(p.log.read_text(errors="replace") for p in (first, second) if p is not None)
    assert "webhook" in logs  # the attempts were logged...
    assert sa not in logs and sa[6:] not in logs and f":{port}/in" not in logs  # ...without secret or URL

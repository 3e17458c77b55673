"""Sends queued batch events to each tenant's endpoint, signed as Standard Webhooks, until one is taken.

Every ``serve`` process runs a sender; deliveries are claimed from the store with a lease
(tokenmill.store.webhooks), so replicas share the queue and a restart loses nothing. An attempt that does
not get a 2xx answer is tried again after ``webhook_retry_seconds``, doubling (with jitter) up to
``webhook_retry_max_seconds``, until the event is ``webhook_max_age_seconds`` old; then it is given up and
the last error kept. Each attempt is signed afresh (its own ``webhook-timestamp``), since receivers refuse
a timestamp more than five minutes off. Redirects are not followed: the operator's URL is the only one
the server posts to. Neither the secret nor the URL reaches a log line or ``last_error``.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

from standardwebhooks import Webhook

from tokenmill.config import Settings, WebhookEndpoint, mask_text
from tokenmill.store import Store
from tokenmill.store import webhooks as store_webhooks

log = logging.getLogger(__name__)
TIMEOUT = 10.0  # seconds a receiver has to answer one attempt
LEASE_SECONDS = 60.0  # longer than an attempt can take, so a live sender never loses its lease
PER_PASS = 32
PARALLEL = 4  # attempts in flight: one slow endpoint does not hold back every other tenant's events
USER_AGENT = "tokenmill-webhooks/1"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # a 3xx is the answer (a failed attempt), never a second request elsewhere


_opener = urllib.request.build_opener(_NoRedirect)


def backoff(attempts: int, first: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds before the next try after ``attempts`` failed ones: first, twice that, four times... up to ``cap``,
    each ±20% so a receiver that comes back is not hit by every queued event in the same second."""
    base = min(cap, first * 2.0 ** max(0, attempts - 1))
    return base * (rng or random).uniform(0.8, 1.2)


def post(endpoint: WebhookEndpoint, event_id: str, payload: str) -> str | None:
    """One signed POST; None when the receiver took it (2xx), else why not, in words fit for a log."""
    sent_at = datetime.now(tz=timezone.utc)
    body = payload.encode()
    signature = Webhook(endpoint.secret).sign(event_id, sent_at, body)
    request = urllib.request.Request(
        endpoint.url,
        data=body,
        method="POST",
        headers={
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": event_id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": signature,
        },
    )
    try:
        with _opener.open(request, timeout=TIMEOUT) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
        exc.close()
    except urllib.error.URLError as exc:  # the reason is the socket's (refused, timed out), without the URL
        return f"no answer: {type(exc.reason).__name__}: {mask_text(str(exc.reason))[:200]}"
    except (OSError, ValueError) as exc:  # a reset mid-answer, a malformed answer; messages may quote the URL
        return f"no answer: {type(exc).__name__}"
    return None if 200 <= status < 300 else f"HTTP {status}"


class WebhookSender:
    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.holder = f"hooks:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"

    def run(self, stop: threading.Event, interval: float = 0.5) -> None:
        while not stop.is_set():
            try:
                busy = self.tick()
            except Exception as exc:  # the store blinked; the next pass tries again
                log.warning("webhooks: %s", (mask_text(str(exc)).splitlines() or [type(exc).__name__])[0])
                busy = 0
            if busy < PER_PASS:
                stop.wait(interval)

    def tick(self) -> int:
        """One pass: claim what is due, attempt each (a few at a time), record every outcome; how many tried."""
        with self.store.session() as s:
            ids = store_webhooks.due_ids(s, PER_PASS)
        claimed = []
        for delivery_id in ids:
            with self.store.session() as s:
                got = store_webhooks.claim(s, delivery_id, self.holder, LEASE_SECONDS)
            if got is not None:
                claimed.append(got)
        if len(claimed) == 1:
            self.attempt(claimed[0])
        elif claimed:
            with ThreadPoolExecutor(min(PARALLEL, len(claimed)), thread_name_prefix="tokenmill-webhook") as pool:
                list(pool.map(self.attempt, claimed))
        return len(claimed)

    def attempt(self, d: store_webhooks.Claimed) -> None:
        endpoint = self.settings.webhook_for(d.owner, d.type)
        if endpoint is None:
            with self.store.session() as s:
                store_webhooks.skip(s, d.id, self.holder)
            return
        error = post(endpoint, d.id, d.payload)
        with self.store.session() as s:
            if error is None:
                kept = store_webhooks.delivered(s, d.id, self.holder)
                log.info("webhook %s (%s) delivered on attempt %d", d.id, d.type, d.attempts)
            else:
                cfg = self.settings
                delay = backoff(d.attempts, cfg.webhook_retry_seconds, cfg.webhook_retry_max_seconds)
                if d.age + delay > self.settings.webhook_max_age_seconds:
                    kept = store_webhooks.give_up(s, d.id, self.holder, error)
                    log.warning("webhook %s (%s): giving up after %d attempts: %s", d.id, d.type, d.attempts, error)
                else:
                    kept = store_webhooks.retry_later(s, d.id, self.holder, delay, error)
                    level = logging.WARNING if d.attempts == 1 else logging.INFO  # once per event by default
                    log.log(level, "webhook %s attempt %d failed (%s); next in %.0fs", d.id, d.attempts, error, delay)
        if not kept:
            log.warning("webhook %s: lease lost during the attempt; another sender has it", d.id)

"""A webhook receiver down for a minute: every event still arrives once it is back, and how soon.

    .venv/bin/python benchmarks/webhook_outage.py --events 200 --down 60 --senders 2

Queues ``--events`` batch events in a fresh SQLite store (one per batch, as a batch's final transition
does), runs ``--senders`` webhook senders (two `serve` replicas' worth) against a receiver on 127.0.0.1
that is down (port closed) for ``--down`` seconds, then up. Prints the events received, duplicates,
attempts per event, and the seconds from the receiver's return to the last event delivered, which the
backoff schedule decides (``--retry-seconds`` doubling up to ``--retry-max-seconds``, as
TOKENMILL_WEBHOOK_RETRY_SECONDS / _MAX_SECONDS). Every event is verified with the official SDK.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from openai import OpenAI
from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import free_port
from tests.server.receiver import Receiver
from tokenmill.config import Settings, WebhookEndpoint
from tokenmill.server.webhooks import WebhookSender
from tokenmill.store import Store
from tokenmill.store import batches as store_batches
from tokenmill.store.states import BatchStatus
from tokenmill.store.tables import WebhookDelivery

OWNER = "key_" + "0" * 24


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200)
    ap.add_argument("--down", type=float, default=60.0, help="seconds the receiver is down")
    ap.add_argument("--senders", type=int, default=2)
    ap.add_argument("--retry-seconds", type=float, default=5.0)
    ap.add_argument("--retry-max-seconds", type=float, default=3600.0)
    args = ap.parse_args()

    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            data_dir=Path(tmp),
            webhooks=(WebhookEndpoint(OWNER, f"http://127.0.0.1:{port}/hook", secret),),
            webhook_retry_seconds=args.retry_seconds,
            webhook_retry_max_seconds=args.retry_max_seconds,
        )
        store = Store(settings.database_url)
        store.migrate()
        for _ in range(args.events):
            with store.session() as s:
                b = store_batches.create_batch(
                    s, owner=OWNER, endpoint="/v1/chat/completions", input_file_id="f", completion_window="24h",
                    metadata=None, idempotency_key=None,
                )  # fmt: skip
                assert store_batches.request_cancel(s, b.id).status == BatchStatus.CANCELLED
        receiver = Receiver(port)
        stop = threading.Event()
        senders = [
            threading.Thread(target=WebhookSender(store, settings).run, args=(stop,)) for _ in range(args.senders)
        ]
        started = time.monotonic()
        for t in senders:
            t.start()
        time.sleep(args.down)
        receiver.start()
        back = time.monotonic()
        receiver.wait(args.events, timeout=args.retry_max_seconds * 1.3 + 60)
        last = time.monotonic()
        time.sleep(2.0)  # late duplicates, if any
        stop.set()
        for t in senders:
            t.join(timeout=30)
        receiver.stop()
        got = receiver.received()
        sdk = OpenAI(api_key="unused")
        ids = [sdk.webhooks.unwrap(r.body, r.headers, secret=secret).id for r in got]
        with store.session() as s:
            attempts = s.execute(select(func.min(WebhookDelivery.attempts), func.max(WebhookDelivery.attempts))).one()
            delivered = s.scalar(select(func.count()).where(WebhookDelivery.state == "delivered"))
        store.dispose()
        sdk.close()
    print(f"events queued            {args.events}")
    print(f"receiver down            {back - started:.1f} s")
    print(f"received (SDK-verified)  {len(set(ids))} distinct, {len(ids) - len(set(ids))} duplicates")
    print(f"delivered in the store   {delivered}")
    print(f"attempts per event       {attempts[0]}..{attempts[1]}")
    print(f"back -> all delivered    {last - back:.1f} s")
    if len(set(ids)) != args.events:
        raise SystemExit("some events never arrived")


if __name__ == "__main__":
    main()

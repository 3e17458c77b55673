"""The Celery app. JSON only on the wire, late acks, one message prefetched, one queue per model family.

The broker is only a doorbell ("chunk N of job J is ready"); correctness comes from leases in the store.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as kombu_sqla
from sqlalchemy.exc import IntegrityError, OperationalError

from tokenmill.config import DEFAULT_ENGINE, Settings, mask_text, mask_url
from tokenmill.errors import ServiceUnavailable

TASK_PROCESS_CHUNK = "tokenmill.process_chunk"


def queue_for(family: str, pinned_quant: str | None = None, engine: str = DEFAULT_ENGINE) -> str:
    """The queue of a model's workers. The engine is part of the identity: a stub (or plugin) worker never
    takes a llama.cpp job's rows, nor the other way round."""
    base = f"tm.{family}@{pinned_quant}" if pinned_quant else f"tm.{family}"
    return base if engine == DEFAULT_ENGINE else f"{base}+{engine}"


def check_broker(app: Celery, settings: Settings) -> None:
    """Fail fast, as one clean line with the password masked, when the broker cannot be reached.

    Long-running processes (worker, scheduler) ride out broker outages with backoff; a command a person
    waits on (`tokenmill run`) must not sit forever behind a wrong URL.
    """
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=2, interval_start=0.5, interval_step=0.5, timeout=5)
    except Exception as exc:
        reason = " ".join(mask_text(str(exc) or type(exc).__name__).split())
        raise ServiceUnavailable(f"broker {mask_url(settings.broker_url)} is unreachable: {reason}") from None


class SQLChannel(kombu_sqla.Channel):
    """kombu's SQL channel, safe when several processes create its tables or declare a queue at once.

    kombu guards "look for it, create it if missing" with a lock that only spans the threads of one
    process. Two local workers starting together both miss the queue row, and the second insert breaks
    the name's unique constraint: an IntegrityError, which Celery does not count as a connection error,
    so that worker died at start-up (and the channel's session was unusable from then on). Both also
    race to create the tables ("already exists"). Either way the thing exists by then: use it.
    """

    def _open(self) -> Any:
        try:
            return super()._open()
        except OperationalError as exc:
            if "already exists" not in str(exc):
                raise
            return super()._open()

    def _get_or_create(self, queue: str) -> Any:
        try:
            return super()._get_or_create(queue)
        except IntegrityError:
            self.session.rollback()
            return self.session.query(self.queue_cls).filter(self.queue_cls.name == queue).one()


class SQLTransport(kombu_sqla.Transport):
    """kombu's SQL transport with :class:`SQLChannel`, polling every 0.1 s instead of 1 s.

    With the default, every message waits up to a second before a worker sees it and every worker
    shutdown waits a second per loop — seconds of a short embedded run. (kombu hands transport options
    to ``create_engine``, so ``polling_interval`` cannot simply go in broker_transport_options.)
    """

    Channel = SQLChannel
    polling_interval = 0.1


# URLs keep their familiar `sqla+sqlite://` form; in tokenmill processes that name means the class above.
TRANSPORT_ALIASES["sqla"] = f"{__name__}:SQLTransport"


def make_app(settings: Settings) -> Celery:
    app = Celery("tokenmill", broker=settings.broker_url, set_as_current=False)
    transport_options: dict[str, object] = {}
    if settings.broker_url.startswith("redis"):
        # Redis redelivers unacked messages after this; leases already stop double work, so keep it long.
        transport_options["visibility_timeout"] = max(3600, int(settings.lease_seconds * 10))
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue="tm.default",
        task_create_missing_queues=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_transport_options=transport_options,
        broker_pool_limit=2,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )  # the task itself is registered by each worker on its own app (tokenmill.workers.tasks.register)
    return app


_edge_app: Celery | None = None


def __getattr__(name: str) -> Celery:
    # `celery --app tokenmill.celery_app:app flower` is an edge: settings come from TOKENMILL_* here only.
    global _edge_app
    if name == "app":
        if _edge_app is None:
            _edge_app = make_app(Settings.from_env())
            # Flower holds one pooled connection for its event receiver and runs its inspect calls
            # (`/api/workers?refresh=1`, the dashboard) in parallel threads: with the worker's limit of 2
            # they wait forever for a free connection. Celery's default limit is enough for any edge tool.
            _edge_app.conf.broker_pool_limit = 10
        return _edge_app
    raise AttributeError(name)

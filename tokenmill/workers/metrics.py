"""Prometheus metrics for one worker process, named after llama-server's under a ``tokenmill_`` prefix."""

from __future__ import annotations

import time
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from tokenmill.engine import Generation, SlotUse
from tokenmill.store import Store, leases
from tokenmill.store import workers as store_workers
from tokenmill.store.states import ResultStatus


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter("tokenmill_prompt_tokens", "Prompt tokens processed", registry=r)
        self.tokens_predicted = Counter("tokenmill_tokens_predicted", "Tokens generated", registry=r)
        self.requests = Counter("tokenmill_requests", "Rows finished", ["status"], registry=r)
        self.failures = Counter("tokenmill_request_failures", "Rows failed", ["reason"], registry=r)
        self.cached = Counter("tokenmill_cached_requests", "Rows served from the result cache", registry=r)
        self.chunk_seconds = Histogram(
            "tokenmill_chunk_duration_seconds", "Wall time per task (its chunk and the next it claimed)", registry=r,
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
        )  # fmt: skip
        self.ttft = Histogram(
            "tokenmill_time_to_first_token_seconds", "Time to first token per row", registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
        )  # fmt: skip
        self.predicted_tps = Gauge(
            "tokenmill_predicted_tokens_seconds", "Generation throughput over the last chunk (tok/s)", registry=r
        )
        self.prompt_tps = Gauge("tokenmill_prompt_tokens_seconds", "Prompt throughput of the last row", registry=r)
        self.processing = Gauge("tokenmill_requests_processing", "Rows in the current chunk", registry=r)
        self.decode_steps = Counter("tokenmill_decode_steps", "llama_decode calls of the batched engine", registry=r)
        self.slot_steps = Counter("tokenmill_slot_steps", "Sequence slots available over decode steps", registry=r)
        self.filled_slot_steps = Counter(
            "tokenmill_filled_slot_steps", "Sequence slots holding a row over decode steps", registry=r
        )
        self.busy_fraction = Gauge(
            "tokenmill_engine_busy_fraction", "Slots filled / slots available over the last task", registry=r
        )
        self.queue_depth = Gauge(
            "tokenmill_queue_depth", "Chunks waiting (pending or queued) on this worker's queues", registry=r
        )

    def observe(self, gen: Generation) -> None:
        self.prompt_tokens.inc(gen.prompt_tokens)
        self.tokens_predicted.inc(gen.completion_tokens)
        self.requests.labels(status=ResultStatus.SUCCEEDED.value).inc()
        self.ttft.observe(gen.ttft_ms / 1000.0)
        if gen.prompt_eval_ms > 0:
            self.prompt_tps.set(gen.evaluated_prompt_tokens / (gen.prompt_eval_ms / 1000.0))

    def observe_failure(self, reason: str) -> None:
        self.requests.labels(status=ResultStatus.FAILED.value).inc()
        self.failures.labels(reason=reason).inc()

    def observe_chunk(self, seconds: float, tokens: int) -> None:
        self.chunk_seconds.observe(seconds)
        if seconds > 0:
            self.predicted_tps.set(tokens / seconds)

    def observe_slots(self, use: SlotUse) -> None:
        self.decode_steps.inc(use.steps)
        self.slot_steps.inc(use.slots)
        self.filled_slot_steps.inc(use.filled)
        if use.busy_fraction is not None:
            self.busy_fraction.set(use.busy_fraction)

    def bind_queue_depth(self, store: Store, worker_id: str) -> None:
        """Read lazily at scrape time, so an idle worker costs the store nothing."""
        last: dict[str, float] = {"at": 0.0, "value": 0.0}

        def depth() -> float:
            if time.monotonic() - last["at"] < 2.0:
                return last["value"]
            try:
                with store.session() as s:
                    value = leases.waiting_on(s, store_workers.queues_of(s, worker_id))
                last.update(at=time.monotonic(), value=float(value))
            except Exception:  # a scrape must not fail because the store blinked
                pass
            return last["value"]

        self.queue_depth.set_function(depth)


DEFAULT_METRICS_HOST = "127.0.0.1"


def start_metrics_server(port: int, metrics: WorkerMetrics, host: str = DEFAULT_METRICS_HOST) -> WSGIServer:
    """Serve ``/metrics``; loopback unless ``host`` widens it, since the endpoint has no auth."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server

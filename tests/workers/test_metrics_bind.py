"""The metrics endpoint has no auth, so it listens on loopback unless told otherwise."""

from __future__ import annotations

import urllib.request

from tests.conftest import run_cli
from tokenmill.config import Settings
from tokenmill.workers.main import WorkerOptions
from tokenmill.workers.metrics import WorkerMetrics, start_metrics_server


def test_metrics_listen_on_loopback_by_default() -> None:
    metrics = WorkerMetrics()
    server = start_metrics_server(0, metrics)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert b"tokenmill_tokens_predicted" in resp.read()
    finally:
        server.shutdown()
        server.server_close()
    assert WorkerOptions().metrics_host == "127.0.0.1"


def test_metrics_host_widens_on_request(settings: Settings) -> None:
    server = start_metrics_server(0, WorkerMetrics(), host="0.0.0.0")
    try:
        assert server.server_address[0] == "0.0.0.0"
    finally:
        server.shutdown()
        server.server_close()
    help_text = " ".join(run_cli(settings, "worker", "--help", timeout=60).stdout.split())
    assert "--metrics-host" in help_text

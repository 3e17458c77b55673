"""A webhook receiver on 127.0.0.1 for tests and benchmarks: records every request it takes, and can be
taken down (the port closed: connection refused) and brought back on the same port."""

from __future__ import annotations

import http.server
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    def __init__(self, port: int, status: int = 200, location: str | None = None) -> None:
        """``status``: what every request is answered (a 3xx with ``location`` to test redirects)."""
        self.port = port
        self.status = status
        self.location = location
        self.got: list[Received] = []
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Receiver:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with outer._lock:
                    outer.got.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(outer.status)
                if outer.location:
                    self.send_header("location", outer.location)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def received(self) -> list[Received]:
        with self._lock:
            return list(self.got)

    def wait(self, n: int, timeout: float) -> list[Received]:
        """At least ``n`` requests, or an AssertionError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while len(self.received()) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"receiver got {len(self.received())} of {n} requests in {timeout:.0f}s")
            time.sleep(0.05)
        return self.received()

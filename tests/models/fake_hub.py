"""A minimal Hugging Face Hub on 127.0.0.1: just what ``hf_hub_download`` needs.

HEAD/GET ``/{owner}/{repo}/resolve/{revision}/{filename}`` answer with ``X-Repo-Commit`` (the commit
the revision resolves to), ``ETag`` (for LFS files the Hub puts the sha256 there) and ``Content-Length``.
``corrupt`` makes the server send other bytes than the ETag promises, like a broken mirror would.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    url: str = ""
    files: dict[tuple[str, str], bytes] = field(default_factory=dict)
    corrupt: set[tuple[str, str]] = field(default_factory=set)
    requests: list[tuple[str, str]] = field(default_factory=list)

    def add(self, repo_id: str, filename: str, data: bytes) -> str:
        self.files[(repo_id, filename)] = data
        return hashlib.sha256(data).hexdigest()

    def body(self, key: tuple[str, str]) -> bytes:
        data = self.files[key]
        return bytes(b ^ 0xFF for b in data[:64]) + data[64:] if key in self.corrupt else data


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _lookup(self) -> tuple[str, str] | None:
            parts = self.path.split("?", 1)[0].strip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                return None
            key = (f"{parts[0]}/{parts[1]}", "/".join(parts[4:]))
            return key if key in hub.files else None

        def _answer(self, send_body: bool) -> None:
            hub.requests.append((self.command, self.path))
            key = self._lookup()
            if key is None:
                self.send_response(404)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = hub.body(key)
            self.send_response(200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(hub.files[key]).hexdigest()}"')
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def do_GET(self) -> None:
            self._answer(send_body=True)

    return Handler


@contextmanager
def serve_fake_hub() -> Iterator[FakeHub]:
    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

"""A TCP proxy whose path can be cut like a network partition, for tests/reliability/test_partition.py.

A partition drops packets: neither end hears anything, no reset, no close. That is modelled as
*holding*, not killing. While paused no byte crosses in either direction and no connection is closed:
a pump that has read bytes keeps them until :meth:`PausableProxy.resume`, and a close seen on one
side is passed on only then. New connections are accepted (the kernel completes the handshake of a
listening socket anyway) but get no upstream until the path heals: the client hears silence, not a
refusal. Refusing or resetting would test the reconnect path, which every driver already takes on
its first error (tests/reliability/test_services.py restarts the real services for that); silence is
the case that needs timeouts. On resume the held bytes are delivered, as TCP's retransmission
delivers them when a partition of seconds heals (it gives up only after many minutes).

:meth:`PausableProxy.drop` models the other kind of outage, a server that is down (stopped, restarting,
its host rebooting): every open connection is closed at once (a FIN, as a stopped Postgres or Redis sends
after killing its sessions) and every new one is reset, until :meth:`PausableProxy.resume`. The fault
harness (benchmarks/fault_harness.py) uses both.

One limit, by construction: the client's kernel talks TCP to this proxy, which stays up, so TCP
keepalives and ``tcp_user_timeout`` see a healthy peer. Only timeouts above TCP (the server's own,
or a client's read timeout) notice this partition.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from typing import Literal

Direction = Literal["to_server", "to_client"]


class PausableProxy:
    """Listens on 127.0.0.1:``port`` and forwards every connection to ``target``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self.paused = threading.Event()  # set while the path is cut (also when a trigger cut it)
        self._lock = threading.Lock()
        self._trigger: tuple[bytes, Direction, bool] | None = None
        self._socks: list[socket.socket] = []
        self._closed = False
        self._refusing = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def pause(self) -> None:
        """Cut the path now."""
        self._open.clear()
        self.paused.set()

    def pause_on(self, pattern: bytes, *, direction: Direction, deliver: bool) -> None:
        """Cut the path the next time bytes holding ``pattern`` travel ``direction``: after they reach the
        far end (``deliver``: the server has the statement, its reply is lost) or before (they are held)."""
        with self._lock:
            self._trigger = (pattern, direction, deliver)

    def drop(self) -> None:
        """The server is down: close every connection now and reset new ones until :meth:`resume`."""
        with self._lock:
            self._refusing = True
            socks, self._socks = self._socks, []
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv; the peer reads EOF
            with contextlib.suppress(OSError):
                sock.close()

    def resume(self) -> None:
        """Heal the path: held bytes (and closes) go through, new connections get their upstream."""
        with self._lock:
            self._trigger = None
            self._refusing = False
        self.paused.clear()
        self._open.set()

    def close(self) -> None:
        self._closed = True
        self._open.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._connect, args=(client,), name="proxy-conn", daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._open.wait()  # a connection made during a partition waits for the path, as a SYN would
        if self._refusing:
            _reset(client)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            if self._closed or self._refusing:
                _reset(client)
                upstream.close()
                return
            self._socks += [client, upstream]
        for src, dst, direction in ((client, upstream, "to_server"), (upstream, client, "to_client")):
            threading.Thread(target=self._pump, args=(src, dst, direction), name="proxy-pump", daemon=True).start()

    def _fires(self, data: bytes, direction: Direction) -> bool | None:
        """None, or (the trigger matched, now spent) whether to deliver ``data`` before the cut."""
        with self._lock:
            if self._trigger is None or self._trigger[1] != direction or self._trigger[0] not in data:
                return None
            deliver = self._trigger[2]
            self._trigger = None
        self.pause()  # before the bytes move, so the other direction holds the reply
        return deliver

    def _pump(self, src: socket.socket, dst: socket.socket, direction: Direction) -> None:
        tail = b""  # a pattern may straddle two reads
        try:
            while data := src.recv(65536):
                deliver = self._fires(tail + data, direction)
                tail = data[-256:]
                if not deliver:
                    self._open.wait()
                if self._closed:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._open.wait()  # a close during the partition reaches the other end only when it heals
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                    sock.close()


def _reset(sock: socket.socket) -> None:
    """Close with a reset (linger 0), as a port nobody listens on answers."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

"""A TCP relay in front of the broker, one port per device, that can cut a device's link.

A link flap must look to paho and to the broker as a real one does: the TCP connection
ends without an MQTT DISCONNECT, the broker publishes the device's Last Will, and paho
reconnects on its own (after its reconnect delay, 1 s and up). ``cut(name)`` shuts down
both sockets of that device's relayed connection; the device's next connection goes
through the same port to the broker again.

One thread and a selector relay every connection. Bytes are relayed as they come, whole
MQTT packets or not; a broker that is down (a restart) refuses the relayed connection too.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
from collections.abc import Iterable

log = logging.getLogger("fedge.fleet")

BUFFER = 65536


class LinkProxy:
    def __init__(
        self, upstream_host: str, upstream_port: int, names: Iterable[str], host: str = "127.0.0.1"
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self._selector = selectors.DefaultSelector()
        self._listeners: dict[str, socket.socket] = {}
        self._pairs: dict[str, list[tuple[socket.socket, socket.socket]]] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._thread: threading.Thread | None = None
        for name in names:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, 0))
            listener.listen(8)
            listener.setblocking(False)
            self._listeners[name] = listener
            self._pairs[name] = []

    def port_of(self, name: str) -> int:
        return int(self._listeners[name].getsockname()[1])

    def start(self) -> LinkProxy:
        for name, listener in self._listeners.items():
            self._selector.register(listener, selectors.EVENT_READ, ("accept", name))
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", ""))
        self._thread = threading.Thread(target=self._serve, name="link-proxy", daemon=True)
        self._thread.start()
        return self

    def cut(self, name: str) -> bool:
        """Drop ``name``'s relayed connection(s); whether one was open."""
        with self._lock:
            pairs = list(self._pairs.get(name, ()))
        for a, b in pairs:
            for sock in (a, b):
                # already closed by the other side: it is cut either way
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        return bool(pairs)

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):  # the loop is gone already
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(5)
        for name in list(self._pairs):
            for a, b in self._pairs.pop(name):
                a.close()
                b.close()
        for listener in self._listeners.values():
            listener.close()
        self._wake_r.close()
        self._wake_w.close()
        self._selector.close()

    def __enter__(self) -> LinkProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the relay thread -------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select(timeout=1.0):
                kind, name = key.data[0], key.data[1]
                if kind == "accept":
                    self._accept(name, key.fileobj)  # type: ignore[arg-type]
                elif kind == "relay":
                    self._relay(name, key.fileobj, key.data[2])  # type: ignore[arg-type]

    def _accept(self, name: str, listener: socket.socket) -> None:
        try:
            client, _ = listener.accept()
        except BlockingIOError:
            return
        client.setblocking(True)
        try:
            upstream = socket.create_connection(self.upstream, timeout=2.0)
        except OSError as exc:
            log.debug("relay for %s: broker unreachable (%s)", name, exc)
            client.close()
            return
        upstream.settimeout(None)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._pairs[name].append((client, upstream))
        self._selector.register(client, selectors.EVENT_READ, ("relay", name, upstream))
        self._selector.register(upstream, selectors.EVENT_READ, ("relay", name, client))

    def _relay(self, name: str, src: socket.socket, dst: socket.socket) -> None:
        try:
            data = src.recv(BUFFER)
            if data:
                dst.sendall(data)
                return
        except OSError:
            pass  # reset or shut down: the pair ends below
        self._drop(name, src, dst)

    def _drop(self, name: str, a: socket.socket, b: socket.socket) -> None:
        with self._lock:
            pairs = self._pairs.get(name, [])
            self._pairs[name] = [p for p in pairs if a not in p]
        for sock in (a, b):
            with contextlib.suppress(KeyError, ValueError):  # gone with its partner already
                self._selector.unregister(sock)
            sock.close()

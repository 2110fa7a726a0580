"""PahoHub: many PahoLinks on one network thread, for a simulated fleet on one machine.

A PahoLink alone runs paho's own network thread (``loop_start``): right for a device, which
has one link. A thousand simulated devices that way are a thousand threads and a connection
storm the broker's listen backlog cannot take. Links made with ``hub=`` are driven here
instead: one thread waits on all their sockets in one selector (epoll) and calls paho's
``loop_read`` / ``loop_write`` / ``loop_misc``, so the same paho callbacks of PahoLink run
(QoS 1, retained, Will, birth on reconnect, inbox, byte counts), only on this thread.

paho's connect is a blocking TCP connect, so a few connector threads make the connections,
first ones and reconnects, at most ``connectors`` at a time and after a lost connection or a
failed attempt with exponential backoff and jitter: a fleet's connections ramp up without
overrunning the broker's backlog, and after a broker restart they do not all come back in
the same millisecond. This module drives paho clients through PahoLink and never imports
paho itself.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import random
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .paho_link import PahoLink

log = logging.getLogger("fedge.protocol")

MISC_INTERVAL = 0.5  # seconds between loop_misc calls (keepalive pings, ping timeouts)
LEAVE_TIMEOUT = 2.0  # seconds a closing link's DISCONNECT may take to go out


class PahoHub:
    """One selector thread and ``connectors`` connector threads for any number of links.

    ``start`` it, make links with ``PahoLink(..., hub=hub)`` (or ``make_link(..., hub=hub)``),
    and ``close`` it after the links.
    """

    def __init__(
        self,
        *,
        connectors: int = 4,
        min_delay: float = 1.0,
        max_delay: float = 30.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_delay = min_delay
        self.max_delay = max_delay
        self._rng = rng or random.Random()
        self._clock = clock
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._cond = threading.Condition()  # guards the sets and the heap below
        self._links: set[PahoLink] = set()
        self._kicked: set[PahoLink] = set()
        self._leaving: dict[PahoLink, float] = {}  # link -> when to stop waiting for DISCONNECT
        self._due: list[tuple[float, int, PahoLink]] = []  # connect attempts, by time
        self._connecting: set[PahoLink] = set()  # scheduled or in progress
        self._in_progress: set[PahoLink] = set()
        self._failures: dict[PahoLink, int] = {}
        self._seq = itertools.count()
        self._woken = False
        self._stopping = False
        # Hub thread only: the socket registered for each link, and its events.
        self._sockets: dict[PahoLink, Any] = {}
        self._events: dict[PahoLink, int] = {}
        self._thread = threading.Thread(target=self._run, name="paho-hub", daemon=True)
        self._connectors = [
            threading.Thread(target=self._connect_loop, name=f"paho-hub-connect-{i}", daemon=True)
            for i in range(max(1, connectors))
        ]

    def start(self) -> PahoHub:
        self._thread.start()
        for thread in self._connectors:
            thread.start()
        return self

    def close(self) -> None:
        """Stop the threads; sockets of links still attached are closed (their Will fires)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._wake()
        for thread in [self._thread, *self._connectors]:
            if thread.is_alive():
                thread.join()
        for link in list(self._links):
            link._client._reset_sockets()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def __len__(self) -> int:
        return len(self._links)

    # -- what PahoLink calls -------------------------------------------------------------

    def attach(self, link: PahoLink) -> None:
        """Drive ``link`` (its client is set up with ``connect_async``): connect now."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("the hub is closed")
            self._links.add(link)
            self._failures[link] = 0
            self._schedule(link, 0.0)

    def detach(self, link: PahoLink) -> None:
        """Stop driving ``link`` once its DISCONNECT is out (or after LEAVE_TIMEOUT), and
        close its socket; returns when done."""
        with self._cond:
            if link not in self._links:
                return
            self._leaving[link] = self._clock() + LEAVE_TIMEOUT
        self.kick(link)
        with self._cond:
            self._cond.wait_for(
                lambda: link not in self._links or self._stopping, LEAVE_TIMEOUT + 5.0
            )

    def kick(self, link: PahoLink) -> None:
        """``link`` has packets to send, or its socket changed: look at it soon."""
        with self._cond:
            self._kicked.add(link)
            if self._woken or threading.current_thread() is self._thread:
                return
            self._woken = True
        self._wake()

    def socket_closing(self, link: PahoLink, sock: Any) -> None:
        """paho is about to close ``sock``: unregister it while its descriptor is still its
        own (a new connection may get the same number)."""
        if threading.current_thread() is self._thread and self._sockets.get(link) is sock:
            self._unregister(link)
        self.kick(link)

    # -- the hub thread ------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending already), or closed
            self._wake_w.send(b"x")

    def _run(self) -> None:
        next_misc = self._clock() + MISC_INTERVAL
        while True:
            for key, mask in self._selector.select(max(0.0, next_misc - self._clock())):
                if key.data is None:
                    self._drain_wake()
                else:
                    self._serve(key.data, mask)
            with self._cond:
                if self._stopping:
                    return
                kicked, self._kicked = self._kicked, set()
                leaving = list(self._leaving.items())
                self._woken = False
            for link in kicked:
                self._sync(link)
            if self._clock() >= next_misc:
                for link in list(self._sockets):
                    self._guarded(link, link._client.loop_misc)
                    self._sync(link)
                next_misc = self._clock() + MISC_INTERVAL
            for link, deadline in leaving:
                self._leave(link, deadline)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _serve(self, link: PahoLink, mask: int) -> None:
        client = link._client
        if mask & selectors.EVENT_READ:
            self._guarded(link, client.loop_read)
        if mask & selectors.EVENT_WRITE:
            self._guarded(link, client.loop_write)
        self._sync(link)

    def _guarded(self, link: PahoLink, step: Callable[[], Any]) -> None:
        """One paho step; an exception (from a callback) costs this link its connection,
        never the hub the other links."""
        try:
            step()
        except Exception:
            log.exception("network step of %s failed; dropping its connection", link.client_id)
            self._unregister(link)
            link._client._reset_sockets()

    def _sync(self, link: PahoLink) -> None:
        """Bring the selector in line with the link's socket and pending writes; schedule a
        reconnect when the connection is gone and nobody closed it."""
        if link not in self._links:
            return
        client = link._client
        sock = client.socket()
        if self._sockets.get(link) is not sock:
            self._unregister(link)
            if sock is not None:
                self._register(link, sock)
        if sock is not None and client.want_write():
            self._guarded(link, client.loop_write)
            if client.socket() is not sock:  # closed while writing (DISCONNECT, or an error)
                self._sync(link)
                return
        if sock is not None:
            wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
            if self._events.get(link) != wanted:
                self._selector.modify(sock, wanted, link)
                self._events[link] = wanted
            if client.is_connected():
                self._failures[link] = 0
            return
        with self._cond:
            if link in self._leaving or link in self._connecting or link._closing:
                return
            failures = self._failures.get(link, 0)
            self._schedule(link, self._backoff(failures))

    def _register(self, link: PahoLink, sock: Any) -> None:
        try:
            self._selector.register(sock, selectors.EVENT_READ, link)
        except KeyError:  # its descriptor number is still on a socket closed elsewhere
            stale = self._selector.get_map()[sock.fileno()]
            self._selector.unregister(stale.fileobj)
            self._sockets.pop(stale.data, None)
            self._events.pop(stale.data, None)
            self._selector.register(sock, selectors.EVENT_READ, link)
        self._sockets[link] = sock
        self._events[link] = selectors.EVENT_READ

    def _unregister(self, link: PahoLink) -> None:
        sock = self._sockets.pop(link, None)
        self._events.pop(link, None)
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError):  # gone, its number reused elsewhere
                self._selector.unregister(sock)

    def _leave(self, link: PahoLink, deadline: float) -> None:
        self._sync(link)
        with self._cond:
            busy = link in self._in_progress  # a connector's connect() would leak its socket
        if busy or (link._client.socket() is not None and self._clock() < deadline):
            return
        self._unregister(link)
        link._client._reset_sockets()
        with self._cond:
            self._leaving.pop(link, None)
            self._links.discard(link)
            self._connecting.discard(link)
            self._failures.pop(link, None)
            self._cond.notify_all()

    # -- connecting ----------------------------------------------------------------------

    def _backoff(self, failures: int) -> float:
        """Seconds before the next attempt: doubling from ``min_delay`` up to ``max_delay``,
        times a random factor in [0.5, 1) so that many links do not try in step."""
        return min(self.max_delay, self.min_delay * 2**failures) * self._rng.uniform(0.5, 1.0)

    def _schedule(self, link: PahoLink, delay: float) -> None:
        """Queue a connect attempt (the caller holds ``_cond``)."""
        self._connecting.add(link)
        heapq.heappush(self._due, (self._clock() + delay, next(self._seq), link))
        self._cond.notify()

    def _connect_loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    wait = self._due[0][0] - self._clock() if self._due else None
                    if wait is not None and wait <= 0:
                        break
                    self._cond.wait(wait)
                _, _, link = heapq.heappop(self._due)
                if link not in self._links or link in self._leaving or link._closing:
                    self._connecting.discard(link)
                    continue
                self._in_progress.add(link)
            failed = False
            try:
                link._client.reconnect()
            except (OSError, ValueError) as exc:  # refused, unreachable, timed out, bad TLS
                failed = True
                log.debug("connect of %s failed: %s", link.client_id, exc)
            with self._cond:
                self._in_progress.discard(link)
                self._connecting.discard(link)
                if failed:
                    self._failures[link] = self._failures.get(link, 0) + 1
            if failed:
                link._on_connect_fail(link._client, None)
            self.kick(link)  # register the new socket, or schedule the next attempt

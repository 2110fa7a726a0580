"""PahoLink: the Link over a real MQTT broker. The only module that imports paho.

MQTT 3.1.1 (amqtt speaks nothing newer), a persistent session by default, QoS 1, an optional
Last Will. paho's network thread (``loop_start``) only puts received messages into a
``queue.Queue`` and records acks: it never blocks, so keepalives keep flowing. paho
reconnects by itself. A reconnect that finds no session (a clean one, or a broker that lost
it) subscribes to every filter again; one whose session the broker kept renews only the
filters the broker has not granted in it, or granted shortly before the connection was lost
(``SESSION_SAVE_MARGIN``): each SUBSCRIBE makes the broker send every retained message again
(MQTT 3.1.1), a whole global model on each reconnect of a flaky link. A filter ended (and
not subscribed again) is ended again on each connect, acknowledged before or not: a broker
that crashed comes back from its last save, which may hold it still.

A link made with ``hub=`` has no thread of its own: a :class:`~fedge.protocol.paho_hub.PahoHub`
drives it with many others on one thread (a simulated fleet), with the same callbacks and so
the same behaviour.

A link made with ``network_thread=False`` has no thread either: its owner's calls drive it.
``get`` waits on the socket itself (select, then paho's ``loop_read`` / ``loop_write`` /
``loop_misc``), ``publish`` and ``ack`` write to the socket at once, and a lost connection
is tried again from ``get`` with backoff. No message, ack or publish crosses threads, which
on a busy server is most of what a small message costs (a socket-pair wake-up and the GIL
handed back and forth per packet). It suits a process whose loop calls ``get`` every fraction
of a second and never blocks for long (the aggregator); a device that trains for minutes
between calls would miss its keepalives, so agents keep the thread.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from .errors import LinkError
from .link import WAKE, Message, TlsSettings, next_message, tls_context
from .topics import validate_filter
from .wire import PUBACK_SIZE, publish_size

if TYPE_CHECKING:
    from .paho_hub import PahoHub

log = logging.getLogger("fedge.protocol")

SUBACK_TIMEOUT = 10.0  # seconds subscribe() waits for the broker's ack
# A broker that saves its sessions now and then (Mosquitto's autosave_interval, 300 s in
# production.conf) and crashes comes back with its last save: the session is present, but
# without what it granted since. A filter granted within this many seconds before the
# connection was lost is renewed even when the session is present.
SESSION_SAVE_MARGIN = 600.0
# A loss is noticed up to about 2.5 keepalives after the broker went (a PINGREQ a keepalive
# after the last packet, its answer awaited another): the margin holds this much of that
# beyond the broker's save interval; a longer keepalive widens it.
DETECTION_SLACK = 300.0
PUMP_INTERVAL = 1.0  # at most this long between loop_misc calls of a link without a thread
LOOP_TIMEOUT_MAX = 15.0  # the longest wait of the network thread on its socket
RETRY_MIN_DELAY, RETRY_MAX_DELAY = 1, 30  # seconds between connect attempts, doubling
FAIL_LOG_INTERVAL = 60.0  # seconds between WARNINGs while the broker cannot be reached
# publish() results after which paho keeps a QoS 1 or 2 message and sends it on reconnect.
LOST = (MQTTErrorCode.MQTT_ERR_NO_CONN, MQTTErrorCode.MQTT_ERR_CONN_LOST)
# Ids may contain '.', which older NATS servers refuse in MQTT topics: they deny the
# subscription, or close the connection at a CONNECT whose Will topic has one.
DOT_HINT = (
    "; NATS servers before nats-io/nats-server#4243 (2023, e.g. Debian's 2.9.10) refuse '.' in"
    " MQTT topics: use fleet and device ids without '.'"
)


def loop_timeout(keepalive: int) -> float:
    """How long the network thread waits on its socket at most. paho's own loop waits 1 s,
    and each wait that ends with nothing to do wakes an idle device; nothing but the keepalive
    is due then (a publish, subscribe or disconnect wakes the thread through paho's socket
    pair), so a quarter of it, which keeps each PINGREQ within 1.25 keepalives of the last
    packet: brokers allow 1.5."""
    if keepalive <= 0:
        return LOOP_TIMEOUT_MAX
    return min(LOOP_TIMEOUT_MAX, max(1.0, keepalive / 4))


@dataclass
class _Request:
    """A SUBSCRIBE (filters with their QoS) or UNSUBSCRIBE (QoS None) on the connection."""

    filters: list[tuple[str, int | None]]
    waiting: bool = True  # subscribe() or unsubscribe() waits for its ack


class _Client(mqtt.Client):
    """paho's client, with the network thread's wait on its socket set by ``loop_timeout``."""

    loop_timeout = 1.0

    def _thread_main(self) -> None:
        # loop_start()'s thread; paho's (2.0-2.2, a private method) is the same with 1 s.
        # tests/protocol: an idle link's network thread must not wake every second.
        try:
            self.loop_forever(timeout=self.loop_timeout, retry_first_connection=True)
        finally:
            self._thread = None


class PahoLink:
    """A Link to an MQTT broker through paho-mqtt 2.x.

    ``subscribe`` waits for the broker's ack when connected. ``close`` first waits up to
    ``close_timeout`` seconds for outstanding publishes to be acknowledged.
    ``network_thread=False``: driven by the owner's calls, no thread (see the module).
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        *,
        will: Message | None = None,
        birth: Message | None = None,
        manual_ack: bool = False,
        keepalive: int = 30,
        clean_session: bool = False,
        username: str | None = None,
        password: str | None = None,
        tls: TlsSettings | None = None,
        max_inflight: int = 20,
        close_timeout: float = 5.0,
        hub: PahoHub | None = None,
        network_thread: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.client_id = client_id
        self.keepalive = keepalive
        self.close_timeout = close_timeout
        # Published on every (re)connect: after a dropped link the broker has published the
        # Will ("offline", retained), and only this tells the fleet the client is back.
        self.birth = birth
        self._will_topic = None if will is None else will.topic
        self.bytes_up = 0
        self.bytes_down = 0
        # Called on the network thread after each received message is queued (never blocks):
        # lets a simulation step only the devices that have something to handle.
        self.on_receive: Callable[[], None] | None = None
        self._hub = hub
        # Driven by the owner's calls (no thread, no hub): when to try connecting next, and
        # the wait after the next failure (doubling from 1 s to 30 s, as paho's own loop).
        self._driven = hub is None and not network_thread
        self._retry_at: float | None = None
        self._retry_delay: float = RETRY_MIN_DELAY
        self._inbox: queue.Queue[Message] = queue.Queue()
        self._cond = threading.Condition()  # guards everything below
        self._filters: dict[str, int] = {}
        # Filters the broker granted in the session, and when (monotonic): see _on_connect.
        self._granted: dict[str, float] = {}
        # When the last connection that the broker accepted was lost (monotonic): a refused
        # attempt since does not move it.
        self._lost_at = 0.0
        self._up = False  # a connection the broker accepted is open
        # Ended and not subscribed again since: each connect ends them again (cheap; a broker
        # that crashed comes back from its last save, which may still hold them).
        self._ended: set[str] = set()
        # SUBSCRIBEs and UNSUBSCRIBEs out on this connection, by mid, until their ack (a
        # reconnect drops the rest: their acks never come); the reason codes of those waited
        # for; acks that came before the sender recorded its mid (it takes them at once).
        self._requests: dict[int, _Request] = {}
        self._answers: dict[int, list[Any]] = {}
        self._early_answers: dict[int, list[Any]] = {}
        self._unacked: set[int] = set()  # publishes not yet sent (QoS 0) or acked (QoS 1, 2)
        self._early_acks: set[int] = set()  # acks that came before publish() saw the mid
        self._connack: str | None = None  # "ok" or the broker's refusal, per connect()
        self._started = False
        self._closing = False
        self._failed_attempts = 0
        self._last_fail_log = time.monotonic()  # the first WARNING is connect()'s
        try:
            client = _Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id,
                clean_session=clean_session,
                protocol=mqtt.MQTTv311,
            )
            client.loop_timeout = loop_timeout(keepalive)
            client.max_inflight_messages_set(max_inflight)
            client.manual_ack_set(manual_ack)
            client.reconnect_delay_set(min_delay=RETRY_MIN_DELAY, max_delay=RETRY_MAX_DELAY)
            if will is not None:
                client.will_set(will.topic, will.payload, qos=1, retain=will.retain)
            if username is not None:
                client.username_pw_set(username, password)
            self._ssl_context = None if tls is None else tls_context(tls)
            if self._ssl_context is not None:
                client.tls_set_context(self._ssl_context)
        except (ValueError, OSError) as exc:  # ssl.SSLError is an OSError
            raise self._error(f"cannot configure the MQTT client: {exc}") from exc
        client.on_socket_open = _no_delay
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_publish = self._on_publish
        if hub is not None:  # paho then queues writes for the hub instead of sending them itself
            client.on_socket_register_write = lambda c, u, sock: hub.kick(self)
            client.on_socket_close = lambda c, u, sock: hub.socket_closing(self, sock)
        self._client = client

    @property
    def connected(self) -> bool:
        return self._client.is_connected()

    def connect(self, timeout: float = 10.0, *, keep_trying: bool = False) -> None:
        if self._started:
            raise self._error("connect() called twice")
        with self._cond:
            self._connack = None
            self._closing = False
        try:
            self._client.connect_async(self.host, self.port, self.keepalive)
        except (ValueError, OSError) as exc:
            raise self._error(f"cannot connect: {exc}") from exc
        if self._hub is not None:
            self._hub.attach(self)
        elif self._driven:
            self._retry_at = time.monotonic()  # now, in the wait below
        else:
            self._client.loop_start()
        self._started = True
        self._wait_for(lambda: self._connack is not None, timeout)
        with self._cond:
            outcome = self._connack
        dot = DOT_HINT if self._will_topic is not None and "." in self._will_topic else ""
        if outcome is None and keep_trying:
            log.warning(
                "no connection to %s:%s as %s after %g s (%s%s); trying on in the background",
                self.host,
                self.port,
                self.client_id,
                timeout,
                self._diagnose(),
                dot,
            )
            return
        if outcome != "ok":
            self._stop()
            if outcome:
                why = f"refused: {outcome}"
            else:
                why = f"no connection after {timeout:g} s ({self._diagnose()}{dot})"
            raise self._error(f"cannot connect, {why}")

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        validate_filter(topic_filter)
        if qos not in (0, 1, 2):
            raise self._error(f"invalid QoS {qos}")
        with self._cond:
            self._filters[topic_filter] = qos
            self._ended.discard(topic_filter)
            self._granted.pop(topic_filter, None)  # renewed on each connect until granted
        if not self.connected:
            return  # _on_connect subscribes
        rc, mid = self._client.subscribe(topic_filter, qos)
        if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            return
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise self._error(f"cannot subscribe to {topic_filter}: {mqtt.error_string(rc)}")
        codes = self._wait_for_ack(mid, _Request([(topic_filter, qos)]))
        if codes is None:
            log.warning("no ack for subscription %s yet; it is renewed on reconnect", topic_filter)
        elif any(code.is_failure for code in codes):
            hint = DOT_HINT if "." in topic_filter else ""
            raise self._error(f"broker refused subscription to {topic_filter}{hint}")

    def unsubscribe(self, topic_filter: str) -> None:
        """Also a filter this link never subscribed to: a persistent session may hold it
        from an earlier run. Offline, acknowledged or not, it is ended again on every
        connect until subscribed again."""
        validate_filter(topic_filter)
        with self._cond:
            self._filters.pop(topic_filter, None)  # a reconnect no longer renews it
            self._granted.pop(topic_filter, None)
            # Before the connected check: a connect in between sends it (_on_connect).
            self._ended.add(topic_filter)
        if not self.connected:
            return
        rc, mid = self._client.unsubscribe(topic_filter)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return  # lost under it: the next connect sends it
        if self._wait_for_ack(mid, _Request([(topic_filter, None)])) is None:
            log.warning(
                "no ack for the end of subscription %s yet; it is sent again on reconnect",
                topic_filter,
            )

    def _wait_for_ack(self, mid: int, request: _Request) -> list[Any] | None:
        """Up to ``SUBACK_TIMEOUT`` for the ack of ``request`` (sent with ``mid``): its
        reason codes, or None; an ack that comes later is settled all the same."""
        with self._cond:
            codes = self._early_answers.pop(mid, None)
            if codes is not None:  # the ack came before the sender recorded its mid
                self._settle(mid, request, codes)
                return codes
            self._requests[mid] = request
        self._wait_for(lambda: mid in self._answers or not self.connected, SUBACK_TIMEOUT)
        with self._cond:
            codes = self._answers.pop(mid, None)
            if codes is None:
                request.waiting = False
        return codes

    def _settle(self, mid: int, request: _Request, codes: list[Any]) -> list[str]:
        """Record an acknowledged request (the caller holds ``_cond``); the filters the
        broker refused."""
        now = time.monotonic()
        refused: list[str] = []
        if request.filters[0][1] is None:  # an UNSUBACK (MQTT 3.1.1: no reason codes)
            return refused  # (ended again on each connect all the same: _ended)
        # A code per filter; one missing (a broker's short SUBACK) leaves its filter ungranted.
        for (topic, qos), code in zip(request.filters, codes, strict=False):
            if code.is_failure:
                refused.append(topic)
            elif self._filters.get(topic) == qos:  # not ended or changed since
                # A renewal in a session that held it already keeps the first grant's time.
                self._granted.setdefault(topic, now)
        return refused

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        if not self._started:
            raise self._error(f"not connected, cannot publish to {topic}")
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as exc:  # bad topic, QoS or size
            raise self._error(f"cannot publish to {topic}: {exc}") from exc
        # At QoS 1 and 2 paho keeps the message and sends it again on reconnect: no
        # connection, or one lost under this very write (a driven link finds that out here).
        queued = info.rc in LOST and qos > 0
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not queued:
            raise self._error(f"cannot publish to {topic}: {mqtt.error_string(info.rc)}")
        self.bytes_up += publish_size(topic, len(payload), qos)
        self.bytes_down += PUBACK_SIZE if qos == 1 else 0
        with self._cond:  # on_publish fires when QoS 0 is sent, QoS 1 acked, QoS 2 completed
            if info.mid in self._early_acks:
                self._early_acks.discard(info.mid)
            else:
                self._unacked.add(info.mid)

    def get(self, timeout: float | None) -> Message | None:
        if not self._driven:
            return next_message(self._inbox, timeout)
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        while True:
            try:
                msg = self._inbox.get_nowait()
                return None if msg is WAKE else msg
            except queue.Empty:
                pass
            left = PUMP_INTERVAL if deadline is None else deadline - time.monotonic()
            self._pump(max(0.0, min(left, PUMP_INTERVAL)))
            if left <= 0 and self._inbox.empty():  # one look at the socket even for 0
                return None

    def wake(self) -> None:
        """A driven link's ``get`` sees it within ``PUMP_INTERVAL`` (it waits on the socket)."""
        self._inbox.put_nowait(WAKE)

    def ack(self, message: Message) -> None:
        if message.qos > 0:
            self._client.ack(message.mid, message.qos)  # a no-op unless manual_ack

    def flush(self, timeout: float) -> bool:
        """Send what is queued and wait, up to ``timeout`` seconds, until the broker has
        acknowledged every publish; whether it has. A link without a network thread writes
        only while its owner calls it: one that is done must flush before it goes quiet."""
        self._wait_for(lambda: not self._unacked or not self.connected, timeout)
        with self._cond:
            return not self._unacked

    def close(self) -> None:
        if not self._started:
            return
        self._wait_for(lambda: not self._unacked or not self.connected, self.close_timeout)
        with self._cond:
            if self._unacked:
                log.warning(
                    "closing %s with %d unacknowledged publishes",
                    self.client_id,
                    len(self._unacked),
                )
        self._stop()

    def _stop(self) -> None:
        with self._cond:
            self._closing = True
        self._client.disconnect()
        if self._hub is not None:
            self._hub.detach(self)  # after the DISCONNECT has gone out
            self._started = False
            return
        if self._driven:  # disconnect() has written the DISCONNECT: nothing left to run
            self._client._reset_sockets()  # a private method (paho 2.0-2.2), as the hub's
            self._started = False
            return
        self._client.loop_stop()
        # paho closes the socket pair that loop_start() made only in Client.__del__, and the
        # client and this link form a cycle: close it now, not in the GC (ResourceWarning).
        # A private method (paho 2.0-2.2); eclipse-paho/paho.mqtt.python#627.
        self._client._reset_sockets(sockpair_only=True)
        self._started = False

    def _wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Until ``predicate()`` or ``timeout`` seconds: on the condition while paho's thread
        (or a hub) runs the connection, else running it here."""
        if not self._driven:
            with self._cond:
                self._cond.wait_for(predicate, timeout)
            return
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._pump(min(left, PUMP_INTERVAL))

    def _pump(self, timeout: float) -> None:
        """Run the connection of a link without a thread for up to ``timeout`` seconds: wait
        for the socket, read what came (paho calls the callbacks below, here), write what is
        queued, keep alive; connect again when due. Returns after at most one packet read."""
        client = self._client
        sock = client.socket()
        if sock is None:
            if self._closing:  # closed: nothing will come
                time.sleep(timeout)
                return
            if self._retry_at is None:  # just lost: paho's own loop also waits before trying
                self._retry_later()
            assert self._retry_at is not None
            if time.monotonic() >= self._retry_at:
                self._attempt()
                sock = client.socket()
            if sock is None:
                assert self._retry_at is not None
                time.sleep(max(0.0, min(timeout, self._retry_at - time.monotonic())))
                return
        # Bytes already decrypted (TLS) do not make the socket readable: do not wait then.
        pending = sock.pending() if hasattr(sock, "pending") else 0
        writing = [sock] if client.want_write() else []
        try:
            readable, writable, _ = select.select([sock], writing, [], 0.0 if pending else timeout)
        except (OSError, ValueError):  # closed under us: paho notices on the next read
            readable, writable = [sock], []
        if readable or pending:
            client.loop_read()
        if client.socket() is not None and (writable or client.want_write()):
            client.loop_write()
        client.loop_misc()
        if client.socket() is None and not self._closing and self._retry_at is None:
            self._retry_later()

    def _retry_later(self) -> None:
        """The next connect attempt after the current wait, which doubles up to the most
        (a broker that keeps refusing is not asked every second); a CONNACK resets it."""
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, RETRY_MAX_DELAY)

    def _attempt(self) -> None:
        """A connect attempt of a link without a thread (a blocking TCP connect, then the
        CONNECT packet; the broker's answer comes through ``_pump``)."""
        self._retry_at = None
        try:
            self._client.reconnect()
        except (OSError, ValueError) as exc:  # refused, unreachable, timed out, bad TLS
            log.debug("connect of %s failed: %s", self.client_id, exc)
            self._retry_later()
            self._on_connect_fail(self._client, None)

    def _diagnose(self, timeout: float = 5.0) -> str:
        """Why the broker cannot be reached: paho's reconnect loop does not say."""
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except OSError as exc:  # TimeoutError included: nothing answered
            return exc.strerror or str(exc) or type(exc).__name__
        try:
            with sock:
                if self._ssl_context is None:
                    return "the port accepts TCP connections"
                with self._ssl_context.wrap_socket(sock, server_hostname=self.host) as tls:
                    # Under TLS 1.3 a broker that refuses the client's certificate (or the
                    # lack of one) says so only after the client's side of the handshake.
                    tls.settimeout(min(timeout, 1.0))
                    if tls.recv(1) == b"":
                        return "the broker closed the connection after the TLS handshake"
                    return "TLS handshake succeeds"
        except TimeoutError:
            return "TLS handshake succeeds"
        except ssl.SSLError as exc:
            return f"TLS: {exc.reason or exc}"
        except OSError as exc:
            return exc.strerror or str(exc)

    def _error(self, what: str) -> LinkError:
        return LinkError(f"{what} (broker {self.host}:{self.port}, client {self.client_id})")

    # paho callbacks: they run on paho's network thread and must never block.

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            log.warning("broker %s:%s refused %s: %s", self.host, self.port, self.client_id, reason)
            with self._cond:
                self._connack = str(reason)
                self._cond.notify_all()
            return
        present = bool(flags.session_present)
        with self._cond:
            self._requests.clear()  # sent on the connection that is gone: no ack comes
            if not present:
                self._granted.clear()
            self._up = True
            # What the broker's session holds needs no SUBSCRIBE, which would make it send
            # every retained message again (a whole global model), unless it was granted
            # too shortly before the loss for a crashed broker's last save to hold it.
            late = max(0.0, 2.5 * self.keepalive - DETECTION_SLACK)
            settled = self._lost_at - SESSION_SAVE_MARGIN - late
            kept = {t for t, at in self._granted.items() if at <= settled} if present else set()
            filters = [(t, qos) for t, qos in self._filters.items() if t not in kept]
            gone = sorted(self._ended)
        # (Acks come after this callback: the requests are recorded before their acks.)
        if filters:
            rc, mid = client.subscribe(filters)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                with self._cond:
                    self._requests[mid] = _Request(list(filters), waiting=False)
        if gone:
            rc, mid = client.unsubscribe(gone)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                with self._cond:
                    self._requests[mid] = _Request([(t, None) for t in gone], waiting=False)
        if self.birth is not None:
            info = client.publish(
                self.birth.topic, self.birth.payload, qos=1, retain=self.birth.retain
            )
            with self._cond:  # waited for as any publish: an ack nobody waits for would stay
                if info.mid in self._early_acks:
                    self._early_acks.discard(info.mid)
                elif info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, *LOST):
                    self._unacked.add(info.mid)
        with self._cond:
            self._connack = "ok"
            self._retry_delay = RETRY_MIN_DELAY
            self._cond.notify_all()
        log.info(
            "connected to %s:%s as %s (session present: %s, %d filters renewed)",
            self.host,
            self.port,
            self.client_id,
            present,
            len(filters),
        )

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._failed_attempts += 1
        now = time.monotonic()
        if now - self._last_fail_log >= FAIL_LOG_INTERVAL:
            self._last_fail_log = now
            log.warning(
                "still cannot reach %s:%s as %s (%d attempts so far), retrying",
                self.host,
                self.port,
                self.client_id,
                self._failed_attempts,
            )

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        with self._cond:
            closing = self._closing
            if self._up:  # paho calls this for refused attempts too: they lose nothing
                self._up = False
                self._lost_at = time.monotonic()
            self._cond.notify_all()  # wake waiters that give up when disconnected
        if closing:
            log.info("disconnected %s from %s:%s", self.client_id, self.host, self.port)
        else:
            log.warning(
                "lost connection of %s to %s:%s (%s), reconnecting",
                self.client_id,
                self.host,
                self.port,
                reason,
            )

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            log.warning("dropped a message with a topic that is not UTF-8 (%s)", self.client_id)
            return
        payload = bytes(message.payload)
        self.bytes_down += publish_size(topic, len(payload), message.qos)
        self.bytes_up += PUBACK_SIZE if message.qos == 1 else 0
        self._inbox.put_nowait(
            Message(topic, payload, bool(message.retain), mid=message.mid, qos=message.qos)
        )
        if self.on_receive is not None:
            self.on_receive()

    def _on_unsubscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any
    ) -> None:
        self._on_ack(mid, codes)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: list[Any], props: Any
    ) -> None:
        self._on_ack(mid, codes)

    def _on_ack(self, mid: int, codes: list[Any]) -> None:
        """A SUBACK or UNSUBACK: settle its request; hand the codes to whoever waits."""
        with self._cond:
            request = self._requests.pop(mid, None)
            if request is None:  # its sender has not recorded the mid yet: it takes them
                self._early_answers[mid] = codes
                refused = []
            else:
                refused = self._settle(mid, request, codes)
                if request.waiting:
                    self._answers[mid] = codes
            self._cond.notify_all()
        if refused and request is not None and not request.waiting:
            log.error(
                "broker refused the subscription of %s to %s: %s",
                self.client_id,
                ", ".join(refused),
                codes,
            )

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any
    ) -> None:
        with self._cond:
            if mid in self._unacked:
                self._unacked.discard(mid)
            else:
                self._early_acks.add(mid)
            self._cond.notify_all()


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """TCP_NODELAY on the broker connection, before CONNECT goes out: MQTT messages are small
    and each waits for its answer, so Nagle's algorithm would hold many of them back until the
    broker's delayed ACK (about 40 ms on Linux) instead of sending them at once."""
    with contextlib.suppress(OSError, AttributeError):  # not a TCP socket (a proxy's, a test's)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

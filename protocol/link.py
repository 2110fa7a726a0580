"""The transport interface: a few methods over MQTT, with an in-memory twin.

``PahoLink`` (``paho_link.py``, the only module that imports paho) talks to a real broker;
``MemoryLink`` (``memory_link.py``) talks to a ``MemoryBroker`` in the same process. Both hand
received messages over through a ``queue.Queue`` that the owner's loop drains with ``get``.
"""

from __future__ import annotations

import queue
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote, urlsplit

from .errors import LinkError

if TYPE_CHECKING:
    from .paho_hub import PahoHub


@dataclass(frozen=True)
class Message:
    """An application message as published or received (``mid`` and ``qos``: as received,
    for ``Link.ack``)."""

    topic: str
    payload: bytes
    retain: bool = False
    mid: int = field(default=0, compare=False)
    qos: int = field(default=0, compare=False)


class Link(Protocol):
    """What the agent and the aggregator need from MQTT.

    ``bytes_up`` / ``bytes_down`` count MQTT bytes of application messages sent and received:
    whole PUBLISH packets (fixed header, topic, packet id, payload) and their PUBACKs, as
    :func:`fedge.protocol.wire.publish_size` computes them; CONNECT, SUBSCRIBE and keepalive
    pings are left out, and so are TCP/IP and TLS.
    """

    client_id: str
    bytes_up: int
    bytes_down: int

    @property
    def connected(self) -> bool: ...

    def connect(self, timeout: float = 10.0, *, keep_trying: bool = False) -> None:
        """Block until connected; raise LinkError after ``timeout`` seconds, or with
        ``keep_trying`` log a WARNING and go on trying in the background (a device service
        must not exit because the broker is not up yet). A broker's refusal always raises."""

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now if connected (and wait for the broker's ack), and on every reconnect."""

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop a subscription, now if connected, and no longer renew it on reconnect."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Queue a message for the broker; QoS 1 messages survive a reconnect."""

    def get(self, timeout: float | None) -> Message | None:
        """The next received message, or None after ``timeout`` seconds (None: wait forever)."""

    def ack(self, message: Message) -> None:
        """Acknowledge a received message once it is processed. Only a link made with
        ``manual_ack`` waits for this: until then the broker keeps the message for its
        session and delivers it again after a crash; other links acknowledge on receipt."""

    def flush(self, timeout: float) -> bool:
        """Wait, up to ``timeout`` seconds, until the broker has every publish made so far;
        whether it has (a link without a network thread writes only while driven)."""

    def close(self) -> None:
        """Disconnect cleanly: the broker does not send the Will."""

    def wake(self) -> None:
        """Make a ``get`` that is waiting return None now (callable from any thread, but not
        from a signal handler: it takes the inbox's lock, which the interrupted code may
        hold). A ``get`` that is not waiting returns None once, as after a timeout."""


# Put in a link's inbox by ``wake``: ``get`` returns None for it.
WAKE = Message("", b"")


def next_message(inbox: queue.Queue[Message], timeout: float | None) -> Message | None:
    """``Link.get`` for links that keep their received messages in ``inbox``."""
    try:
        msg = inbox.get(timeout=None if timeout is None else max(timeout, 0.0))
    except queue.Empty:
        return None
    return None if msg is WAKE else msg


@dataclass(frozen=True)
class TlsSettings:
    """How a link verifies the broker and proves who it is (TLS 1.2 or newer).

    ``ca_file`` None trusts the system's CAs; ``cert_file`` and ``key_file`` are a client
    certificate (the identity a broker with ``use_identity_as_username`` sees).
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify_hostname: bool = True


def tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """A client context: TLS 1.2 or newer, the broker checked against ``ca_file`` (or the
    system's CAs) and, unless turned off, its hostname; a client certificate if given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = tls.verify_hostname
    if tls.cert_file is not None:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


def make_link(
    url: str,
    client_id: str,
    will: Message | None = None,
    *,
    birth: Message | None = None,
    manual_ack: bool = False,
    tls: TlsSettings | None = None,
    username: str | None = None,
    password: str | None = None,
    hub: PahoHub | None = None,
    network_thread: bool = True,
) -> Link:
    """A PahoLink for ``mqtt[s]://[user[:password]@]host[:port]`` (ports 1883 and 8883).

    ``birth`` is published on every (re)connect, the counterpart of the Last Will ``will``.
    ``mqtts`` always uses TLS (``tls`` None: the system's CAs, no client certificate);
    ``mqtt`` never does, and refuses ``tls`` rather than ignore it. ``username`` and
    ``password`` override those in the URL. ``hub``: driven by that PahoHub, not a thread of
    its own; ``network_thread`` False: driven by the owner's calls (``get`` waits on the
    socket), for a loop that calls ``get`` often and never blocks for long.
    """
    try:
        parts = urlsplit(url)
        port = parts.port or DEFAULT_PORTS.get(parts.scheme, 0)
    except ValueError as exc:
        raise LinkError(f"bad broker url {url!r}: {exc}") from exc
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        raise LinkError(f"bad broker url {url!r}: want mqtt://host[:port] or mqtts://host[:port]")
    if parts.scheme == "mqtt" and tls is not None:
        raise LinkError(
            f"broker url {url!r} is plain MQTT but TLS settings were given: use mqtts://"
        )
    if parts.scheme == "mqtts" and tls is None:
        tls = TlsSettings()
    from .paho_link import PahoLink  # paho is imported only where it is used

    if username is None and parts.username is not None:
        username = unquote(parts.username)
        password = unquote(parts.password) if parts.password is not None else None
    return PahoLink(
        parts.hostname,
        port,
        client_id,
        will=will,
        birth=birth,
        manual_ack=manual_ack,
        username=username,
        password=password,
        tls=tls,
        hub=hub,
        network_thread=network_thread,
    )

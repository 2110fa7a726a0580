"""The transport interface: a few methods over MQTT, with an in-memory twin.

``PahoLink`` (``paho_link.py``, the only module that imports paho) talks to a real broker;
``MemoryLink`` (``memory_link.py``) talks to a ``MemoryBroker`` in the same process. Both hand
received messages over through a ``queue.Queue`` that the owner's loop drains with ``get``.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote, urlsplit

from .errors import LinkError


@dataclass(frozen=True)
class Message:
    """An application message as published or received."""

    topic: str
    payload: bytes
    retain: bool = False


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

    def connect(self, timeout: float = 10.0) -> None:
        """Block until connected; raise LinkError after ``timeout`` seconds."""

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now if connected (and wait for the broker's ack), and on every reconnect."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Queue a message for the broker; QoS 1 messages survive a reconnect."""

    def get(self, timeout: float | None) -> Message | None:
        """The next received message, or None after ``timeout`` seconds (None: wait forever)."""

    def close(self) -> None:
        """Disconnect cleanly: the broker does not send the Will."""


def next_message(inbox: queue.Queue[Message], timeout: float | None) -> Message | None:
    """``Link.get`` for links that keep their received messages in ``inbox``."""
    try:
        return inbox.get(timeout=None if timeout is None else max(timeout, 0.0))
    except queue.Empty:
        return None


def make_link(url: str, client_id: str, will: Message | None = None) -> Link:
    """A PahoLink for ``mqtt://[user[:password]@]host[:port]`` (port 1883 by default)."""
    try:
        parts = urlsplit(url)
        port = parts.port or 1883
    except ValueError as exc:
        raise LinkError(f"bad broker url {url!r}: {exc}") from exc
    if parts.scheme != "mqtt" or not parts.hostname or parts.path not in ("", "/"):
        raise LinkError(f"bad broker url {url!r}: want mqtt://host[:port]")
    from .paho_link import PahoLink  # paho is imported only where it is used

    return PahoLink(
        parts.hostname,
        port,
        client_id,
        will=will,
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )

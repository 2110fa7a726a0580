"""An in-memory broker and link: the twin of PahoLink for tests and single-process runs.

The broker routes by MQTT filter (``+``, ``#``), keeps retained messages (an empty retained
publish clears one) and sends them on subscribe with ``retain=True``, and publishes a link's
Will when the link is killed, not when it is closed. Sessions are not persistent: a link
receives what is published while it is connected. QoS is accepted and ignored (delivery is
exact). A shared subscription (``$share/{group}/{filter}``) hands each matching message to
one member of its group in turn, and no retained messages, as Mosquitto does. Thread-safe.
"""

from __future__ import annotations

import queue
import threading

from .errors import LinkError
from .link import WAKE, Message, next_message
from .topics import split_shared, topic_matches, validate_filter
from .wire import PUBACK_SIZE, publish_size


class MemoryBroker:
    """Routes messages between MemoryLinks of one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._links: dict[str, MemoryLink] = {}
        self._filters: dict[str, set[str]] = {}  # client id -> subscribed filters
        self._retained: dict[str, Message] = {}
        self._turns: dict[tuple[str, str], int] = {}  # shared subscription -> messages so far

    def attach(self, link: MemoryLink) -> None:
        with self._lock:
            old = self._links.get(link.client_id)
            if old is not None and old is not link:
                old.connected = False  # as in MQTT, a second connect with one id takes over
            self._links[link.client_id] = link
            self._filters[link.client_id] = set()

    def detach(self, link: MemoryLink, *, send_will: bool) -> None:
        with self._lock:
            if self._links.get(link.client_id) is link:
                del self._links[link.client_id]
                del self._filters[link.client_id]
        if send_will and link.will is not None:
            self.publish(link.will)

    def subscribe(self, link: MemoryLink, topic_filter: str) -> None:
        with self._lock:
            if self._links.get(link.client_id) is not link:
                raise LinkError(f"client {link.client_id} is not connected")
            self._filters[link.client_id].add(topic_filter)
            if split_shared(topic_filter)[0] is not None:
                return
            retained = [m for t, m in self._retained.items() if topic_matches(topic_filter, t)]
            for message in retained:
                link.deliver(message)

    def unsubscribe(self, link: MemoryLink, topic_filter: str) -> None:
        with self._lock:
            self._filters.get(link.client_id, set()).discard(topic_filter)

    def publish(self, message: Message) -> None:
        with self._lock:
            if message.retain and message.payload:
                self._retained[message.topic] = message
            elif message.retain:
                self._retained.pop(message.topic, None)
            live = Message(message.topic, message.payload, retain=False)
            shared: dict[tuple[str, str], list[str]] = {}
            for client_id, filters in self._filters.items():
                direct = False
                for topic_filter in filters:
                    group, plain = split_shared(topic_filter)
                    if not topic_matches(plain, message.topic):
                        continue
                    if group is None:
                        direct = True
                    else:
                        shared.setdefault((group, plain), []).append(client_id)
                if direct:
                    self._links[client_id].deliver(live)
            for key, members in shared.items():
                turn = self._turns.get(key, 0)
                self._turns[key] = turn + 1
                self._links[sorted(members)[turn % len(members)]].deliver(live)


class MemoryLink:
    """A Link to a MemoryBroker. ``kill()`` drops it abruptly, so the broker sends its Will."""

    def __init__(self, broker: MemoryBroker, client_id: str, will: Message | None = None) -> None:
        self.broker = broker
        self.client_id = client_id
        self.will = will
        self.bytes_up = 0
        self.bytes_down = 0
        self.connected = False
        self._inbox: queue.Queue[Message] = queue.Queue()

    def connect(self, timeout: float = 10.0, *, keep_trying: bool = False) -> None:
        self.broker.attach(self)
        self.connected = True

    def ack(self, message: Message) -> None:
        """The in-memory broker keeps nothing for a session: nothing to acknowledge."""

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        validate_filter(topic_filter)
        self._check(qos)
        self.broker.subscribe(self, topic_filter)

    def unsubscribe(self, topic_filter: str) -> None:
        self.broker.unsubscribe(self, topic_filter)

    def flush(self, timeout: float) -> bool:
        return True  # the in-memory broker has every publish at once

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self._check(qos)
        if not topic or "+" in topic or "#" in topic:
            raise LinkError(f"invalid topic {topic!r} (client {self.client_id})")
        self.bytes_up += publish_size(topic, len(payload), qos)
        self.bytes_down += PUBACK_SIZE if qos == 1 else 0
        self.broker.publish(Message(topic, bytes(payload), retain))

    def get(self, timeout: float | None) -> Message | None:
        return next_message(self._inbox, timeout)

    def wake(self) -> None:
        self._inbox.put_nowait(WAKE)

    def close(self) -> None:
        """Clean disconnect: no Will."""
        self._drop(send_will=False)

    def kill(self) -> None:
        """Abrupt disconnect, as if the device lost power: the broker sends the Will."""
        self._drop(send_will=True)

    def deliver(self, message: Message) -> None:
        """Called by the broker (under its lock): never blocks."""
        # Counted as a QoS 1 delivery with its PUBACK, as the paho link would see it.
        self.bytes_down += publish_size(message.topic, len(message.payload), 1)
        self.bytes_up += PUBACK_SIZE
        self._inbox.put_nowait(message)

    def _drop(self, *, send_will: bool) -> None:
        if self.connected:
            self.connected = False
            self.broker.detach(self, send_will=send_will)

    def _check(self, qos: int) -> None:
        if qos not in (0, 1, 2):
            raise LinkError(f"invalid QoS {qos} (client {self.client_id})")
        if not self.connected:
            raise LinkError(f"client {self.client_id} is not connected")

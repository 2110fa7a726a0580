"""A device's link with faults in it: answers that vanish, come late, or are poisoned.

``FaultyLink`` wraps the real link a simulated device's :class:`fedge.agent.daemon.Agent`
uses, so the agent itself runs unchanged. It reads the round announcements the agent
receives (to learn each round's deadline) and acts on the agent's answers, the update or
skip notice it publishes on ``update/{device}``:

- dropped (``plan.dropped``): the device trained, and its answer never reaches the broker;
- delayed (``plan.training_delay``): the answer leaves the announcement time plus the
  drawn training time; one that would arrive after the deadline is dropped at the deadline
  (a straggler that misses the round is a dropout for it);
- hung (``hung``): no answer of the device ever reaches the broker, while it stays
  connected and its status says online (a process stuck after connecting);
- poisoned: the honest delta is decoded from the update, multiplied by the poison factor
  (-1: sign-flip) and encoded again with the same codec. The agent keeps its honest
  residual: only what crosses the wire is poisoned.

Everything else (status, subscriptions, received messages) passes through untouched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from fedge.protocol import (
    DecodeError,
    Link,
    Message,
    RoundAnnouncement,
    Topics,
    UpdateHeader,
    decode,
    decode_delta,
    decode_skip,
    encode,
    encode_delta,
    is_chunk,
    is_signed,
    is_skip,
    parse_codec,
)
from fedge.protocol.secagg import is_secagg
from fedge.protocol.signing import OVERHEAD as SIGNATURE_OVERHEAD

from . import plan
from .ledger import Ledger
from .settings import FaultSettings

log = logging.getLogger("fedge.fleet")

REMEMBERED_ROUNDS = 16  # deadlines kept per device


class FaultyLink:
    """A :class:`fedge.protocol.Link` around ``inner`` that injects the faults of ``settings``
    into the answers of device ``device_id`` (number ``index`` in the plan's draws).

    ``shapes`` (``{tensor: dims}`` of the model) must be set before a poisoned device
    answers. Waits for stragglers end early when ``stop`` is set.
    """

    def __init__(
        self,
        inner: Link,
        *,
        device_id: str,
        index: int,
        fleet: str,
        settings: FaultSettings,
        ledger: Ledger,
        round_timeout: float,
        stop: threading.Event,
        poisoned: bool = False,
        hung: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.inner = inner
        self.device_id = device_id
        self.index = index
        self.settings = settings
        self.ledger = ledger
        self.round_timeout = round_timeout
        self.poisoned = poisoned and settings.poison is not None
        self.hung = hung
        self.shapes: dict[str, list[int]] | None = None
        self._stop = stop
        self._clock = clock
        self._topics = Topics(fleet)
        self._answers = self._topics.update(device_id)
        self._deadlines: dict[int, float] = {}  # rounds that select this device
        self._latest: int | None = None
        self._fates: dict[int, bool] = {}  # round id -> whether its answer is delivered
        self._codec_rng = plan.generator(settings.seed, "poison_codec", index)

    # -- the Link interface -----------------------------------------------------------------

    @property
    def client_id(self) -> str:
        return self.inner.client_id

    @client_id.setter
    def client_id(self, value: str) -> None:
        self.inner.client_id = value

    @property
    def bytes_up(self) -> int:
        return self.inner.bytes_up

    @bytes_up.setter
    def bytes_up(self, value: int) -> None:
        self.inner.bytes_up = value

    @property
    def bytes_down(self) -> int:
        return self.inner.bytes_down

    @bytes_down.setter
    def bytes_down(self, value: int) -> None:
        self.inner.bytes_down = value

    @property
    def connected(self) -> bool:
        return self.inner.connected

    def connect(self, timeout: float = 10.0, **options: Any) -> None:
        self.inner.connect(timeout, **options)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.inner.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        self.inner.unsubscribe(topic_filter)

    def flush(self, timeout: float) -> bool:
        return self.inner.flush(timeout)

    def wake(self) -> None:
        self.inner.wake()

    def get(self, timeout: float | None) -> Message | None:
        msg = self.inner.get(timeout)
        if msg is not None and msg.topic == self._topics.round and msg.payload:
            self._note_round(msg.payload)
        return msg

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        if topic == self._answers:
            answer = self._answer(payload)
            if answer is None:
                return
            payload = answer
        self.inner.publish(topic, payload, qos, retain)

    def close(self) -> None:
        self.inner.close()

    # -- faults -----------------------------------------------------------------------------

    def _note_round(self, payload: bytes) -> None:
        body = payload[SIGNATURE_OVERHEAD:] if is_signed(payload) else payload
        try:
            ann = decode(body).msg
        except DecodeError:
            return  # the agent refuses it and says why
        if isinstance(ann, RoundAnnouncement) and self.device_id in ann.selected:
            self._deadlines[ann.round_id] = ann.deadline
            self._latest = ann.round_id
            for old in sorted(self._deadlines)[:-REMEMBERED_ROUNDS]:
                del self._deadlines[old]

    def _round_of(self, payload: bytes) -> int | None:
        if is_secagg(payload):
            return None  # a secure round's key exchange: a device drops with its update
        if is_chunk(payload):  # chunks do not say; they follow the announcement just received
            return self._latest
        try:
            if is_skip(payload):
                return decode_skip(payload, self.device_id).round_id
            header = decode(payload).msg
        except DecodeError as exc:
            log.warning("%s: answer not understood (%s); sent unchanged", self.device_id, exc)
            return None
        return header.round_id if isinstance(header, UpdateHeader) else None

    def _answer(self, payload: bytes) -> bytes | None:
        round_id = self._round_of(payload)
        if self.hung:
            if round_id is not None:
                self.ledger.hung(round_id, self.device_id)
            return None
        if round_id is None:
            return payload
        if round_id not in self._fates:
            self._fates = {r: f for r, f in self._fates.items() if r > round_id - REMEMBERED_ROUNDS}
            self._fates[round_id] = self._decide(round_id)
        if not self._fates[round_id]:
            return None
        if self.poisoned and not is_skip(payload) and not is_chunk(payload):
            return self._poison(payload, round_id)
        return payload

    def _decide(self, round_id: int) -> bool:
        """Whether this round's answer is delivered; waits out a straggler's training time."""
        if plan.dropped(self.settings, self.index, round_id):
            self.ledger.dropped(round_id, self.device_id)
            log.info("round %d: %s vanished before answering", round_id, self.device_id)
            return False
        delay = plan.training_delay(self.settings, self.index, round_id)
        deadline = self._deadlines.get(round_id)
        if delay is None or deadline is None:
            return True
        due = deadline - self.round_timeout + delay  # from the announcement
        late = due > deadline
        self.ledger.delayed(round_id, self.device_id, delay, late=late)
        self._stop.wait(max(0.0, min(due, deadline) - self._clock()))
        if late:
            log.info("round %d: %s needed %.1f s to train", round_id, self.device_id, delay)
        return not late

    def _poison(self, payload: bytes, round_id: int) -> bytes:
        assert self.settings.poison is not None
        if self.shapes is None:
            raise RuntimeError(f"{self.device_id}: poisoned link has no model shapes")
        decoded = decode(payload)
        header = decoded.msg
        assert isinstance(header, UpdateHeader)
        honest = decode_delta(decoded.tensors, {"codec": header.codec, "shapes": self.shapes})
        factor = np.float32(self.settings.poison.factor)
        bad = {name: (value * factor).astype(np.float32) for name, value in honest.items()}
        encoded = encode_delta(bad, parse_codec(header.codec), self._codec_rng)
        self.ledger.poisoned(round_id, self.device_id)
        return encode(header, encoded.tensors)

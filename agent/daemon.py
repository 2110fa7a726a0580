"""The device daemon's loop: one thread owns the state; messages arrive through a queue.

The link's network thread only enqueues (see DESIGN.md, Concurrency). This loop takes
a message, and on a round announcement that selects this device it trains on the
global model named by the announcement and publishes the weight delta::

    retained global  -> remember weights + version
    round(selected)  -> set_weights(global); train E epochs; publish delta, n
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from fedge.models.runtime import Runtime
from fedge.protocol import (
    DecodeError,
    GlobalModelHeader,
    Link,
    Message,
    RoundAnnouncement,
    Status,
    Topics,
    UpdateHeader,
    decode,
    encode,
)

from .dataset import Dataset
from .state import AgentState
from .trainer import train_local

log = logging.getLogger("fedge.agent")


@dataclass
class AgentStats:
    rounds_trained: int = 0
    models_applied: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


class Agent:
    """One device. ``link`` is connected by :meth:`start`; :meth:`run` loops until stopped."""

    def __init__(
        self,
        *,
        device_id: str,
        fleet: str,
        link: Link,
        runtime: Runtime,
        data: Dataset,
        state: AgentState | None = None,
        save_state: Callable[[AgentState], None] | None = None,
        rng: np.random.Generator | None = None,
        clock: Callable[[], float] = time.time,
        on_trained: Callable[[int, dict[str, np.ndarray]], None] | None = None,
    ) -> None:
        self.device_id = device_id
        self.topics = Topics(fleet)
        self.link = link
        self.runtime = runtime
        self.data = data
        self.state = state or AgentState()
        self._save = save_state or (lambda s: None)
        self.rng = rng or np.random.default_rng()
        self.clock = clock
        # Called with (round id, local weights) after local training, before the upload:
        # field tests use it to score each device's own model; a device needs nothing here.
        self.on_trained = on_trained
        self.stats = AgentStats()
        self.global_weights: dict[str, np.ndarray] | None = None
        self.global_version = -1
        self.pending: RoundAnnouncement | None = None

    @staticmethod
    def will(device_id: str, fleet: str) -> Message:
        """The Last Will the broker publishes if this device vanishes."""
        payload = encode(Status(device_id=device_id, state="offline", timestamp=0.0))
        return Message(Topics(fleet).status(device_id), payload, retain=True)

    def start(self, timeout: float = 30.0) -> None:
        self.link.connect(timeout=timeout)
        self.link.subscribe(self.topics.global_model, qos=1)
        self.link.subscribe(self.topics.round, qos=1)
        self._status("online")
        log.info(
            "agent %s online in fleet %s, %d local samples, runtime %s",
            self.device_id,
            self.topics.fleet,
            len(self.data),
            self.runtime.describe(),
        )

    def stop(self) -> None:
        try:
            self._status("offline")
        finally:
            self.link.close()

    def run(self, stop: threading.Event, poll: float = 0.5) -> None:
        while not stop.is_set():
            self.step(poll)

    def step(self, timeout: float | None) -> bool:
        """Handle at most one message; returns whether one arrived."""
        msg = self.link.get(timeout)
        if msg is None:
            return False
        self.handle(msg)
        return True

    def _status(self, state: str) -> None:
        payload = encode(Status(device_id=self.device_id, state=state, timestamp=self.clock()))
        self.link.publish(self.topics.status(self.device_id), payload, qos=1, retain=True)

    def handle(self, msg: Message) -> None:
        if not msg.payload:  # a cleared retained message
            return
        if msg.topic not in (self.topics.global_model, self.topics.round):
            # Some brokers (amqtt) also hand over retained messages of other topics.
            self.stats.rejected["unexpected_topic"] += 1
            log.debug("ignored message on %s", msg.topic)
            return
        try:
            decoded = decode(msg.payload)
        except DecodeError as exc:
            self.stats.rejected[exc.reason] += 1
            log.warning("rejected message on %s: %s", msg.topic, exc)
            return
        header = decoded.msg
        if isinstance(header, GlobalModelHeader) and msg.topic == self.topics.global_model:
            self._on_global(header, decoded.tensors)
        elif isinstance(header, RoundAnnouncement) and msg.topic == self.topics.round:
            self._on_round(header)
        else:
            self.stats.rejected["unexpected"] += 1
            log.warning("unexpected %s message on %s", header.kind, msg.topic)

    def _on_global(self, header: GlobalModelHeader, tensors: dict[str, np.ndarray]) -> None:
        if header.model_version <= self.global_version:
            return
        try:
            self.runtime.set_weights(tensors)
        except ValueError as exc:
            self.stats.rejected["model_mismatch"] += 1
            log.error(
                "global model v%d does not fit the local model: %s", header.model_version, exc
            )
            return
        self.global_weights = {k: np.array(v, dtype=np.float32) for k, v in tensors.items()}
        self.global_version = header.model_version
        self.stats.models_applied += 1
        self.state.model_version = header.model_version
        self._save(self.state)
        log.info("applied global model v%d (round %d)", header.model_version, header.round_id)
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._on_round(pending)

    def _on_round(self, ann: RoundAnnouncement) -> None:
        if self.device_id not in ann.selected or ann.round_id <= self.state.last_round:
            return
        if ann.deadline < self.clock():
            log.info("round %d: deadline already passed, sitting out", ann.round_id)
            return
        if self.global_version < ann.model_version:
            self.pending = ann  # the global model it names has not arrived yet
            return
        if self.global_version > ann.model_version or self.global_weights is None:
            log.info(
                "round %d: wants model v%d, have v%d; ignored",
                ann.round_id,
                ann.model_version,
                self.global_version,
            )
            return
        self._train_and_upload(ann)

    def _train_and_upload(self, ann: RoundAnnouncement) -> None:
        assert self.global_weights is not None
        self._status("training")
        started = time.perf_counter()
        self.runtime.set_weights(self.global_weights)
        cfg = ann.config
        result = train_local(
            self.runtime,
            self.data,
            epochs=cfg.epochs,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            rng=self.rng,
            mu=cfg.mu,
        )
        local = self.runtime.get_weights()
        if self.on_trained is not None:
            self.on_trained(ann.round_id, local)
        delta = {k: (local[k] - self.global_weights[k]).astype(np.float32) for k in local}
        header = UpdateHeader(
            device_id=self.device_id,
            round_id=ann.round_id,
            update_id=uuid.uuid4().hex,
            base_version=ann.model_version,
            num_samples=result.samples,
            train_loss=result.loss,
        )
        self.link.publish(self.topics.update(self.device_id), encode(header, delta), qos=1)
        self.state.last_round = ann.round_id
        self._save(self.state)
        self.stats.rounds_trained += 1
        self._status("idle")
        log.info(
            "round %d: trained %d steps on %d samples in %.2fs, loss %.4f; delta sent",
            ann.round_id,
            result.steps,
            result.samples,
            time.perf_counter() - started,
            result.loss,
        )

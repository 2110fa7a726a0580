"""The round coordinator: announce, collect, validate, average, publish, log.

One thread owns all state; the link's network thread only enqueues messages.
Each round moves through::

    waiting --(enough devices online)--> collecting --(all answered, or deadline
    with quorum)--> averaged: new global published (retained), line in rounds.jsonl
                 \\--(deadline without quorum)--> failed: a new round is announced

Validation rejects an update with a reason that is logged once and counted:
``wrong_round``, ``not_selected``, ``duplicate``, ``already_answered``,
``stale_base``, ``shape_mismatch``, ``not_finite``, ``topic_mismatch`` and the
envelope decoder's own reasons.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fedge.protocol import (
    DecodeError,
    GlobalModelHeader,
    Link,
    Message,
    RoundAnnouncement,
    SkipNotice,
    Status,
    Topics,
    TrainingConfig,
    UpdateHeader,
    decode,
    encode,
)

from .config import AggregatorConfig
from .store import Store
from .strategy import make_strategy

log = logging.getLogger("fedge.aggregator")

Weights = dict[str, np.ndarray]
Evaluator = Callable[[Weights], tuple[float, float]]


@dataclass
class OpenRound:
    round_id: int
    selected: list[str]
    started: float
    deadline: float
    deltas: dict[str, Weights] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)
    skipped: set[str] = field(default_factory=set)
    bytes_received: int = 0

    @property
    def answered(self) -> set[str]:
        return set(self.deltas) | self.skipped


class Aggregator:
    def __init__(
        self,
        config: AggregatorConfig,
        *,
        link: Link,
        store: Store,
        initial_weights: Weights,
        evaluator: Evaluator | None = None,
        on_round: Callable[[dict], None] | None = None,
        clock: Callable[[], float] = time.time,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.cfg = config
        self.topics = Topics(config.fleet)
        self.link = link
        self.store = store
        self.evaluator = evaluator
        self.on_round = on_round or (lambda summary: None)
        self.clock = clock
        self.rng = rng or np.random.default_rng(config.seed)
        self.online: set[str] = set()
        self.rejected: Counter[str] = Counter()
        self.current: OpenRound | None = None
        self.done = False
        self.strategy = make_strategy(config.strategy)
        resumed = store.latest_model()
        if resumed is None:
            self.version, self.weights = (
                0,
                {k: np.asarray(v, np.float32) for k, v in initial_weights.items()},
            )
            store.save_model(0, 0, self.weights)
        else:
            self.version, _, self.weights = resumed
            self.strategy.load_state(store.strategy_state(self.version))
            abandoned = store.abandon_open_rounds()
            log.info("resumed at model v%d (%d open round(s) abandoned)", self.version, abandoned)
        self.completed = store.completed_rounds()
        self.next_round_id = store.last_round_id() + 1
        self._check_done()

    # -- lifecycle -----------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        self.link.connect(timeout=timeout)
        self.link.subscribe(self.topics.updates, qos=1)
        self.link.subscribe(self.topics.statuses, qos=1)
        self._publish_global(round_id=0)
        log.info(
            "aggregator for fleet %s online at model v%d, strategy %s",
            self.cfg.fleet,
            self.version,
            self.strategy.describe(),
        )

    def run(self, stop: threading.Event, poll: float = 0.2) -> None:
        while not stop.is_set() and not self.done:
            self.step(poll)

    def step(self, timeout: float | None) -> None:
        msg = self.link.get(timeout)
        if msg is not None:
            self.handle(msg)
        self.tick()

    def _check_done(self) -> None:
        self.done = bool(self.cfg.rounds) and self.completed >= self.cfg.rounds

    # -- messages ------------------------------------------------------------------
    def handle(self, msg: Message) -> None:
        if not msg.payload:
            return
        if not msg.topic.startswith((f"{self.topics.base}/update/", f"{self.topics.base}/status/")):
            # Some brokers (amqtt) hand a new subscription retained messages of other topics.
            self.rejected["unexpected_topic"] += 1
            log.debug("ignored message on %s", msg.topic)
            return
        try:
            decoded = decode(msg.payload)
        except DecodeError as exc:
            self._reject(exc.reason, msg.topic, str(exc))
            return
        header = decoded.msg
        if isinstance(header, Status):
            self._on_status(msg.topic, header)
        elif isinstance(header, UpdateHeader | SkipNotice):
            self._on_update(msg, header, decoded.tensors)
        else:
            self._reject("unexpected", msg.topic, f"{header.kind} message")

    def _reject(self, reason: str, topic: str, detail: str) -> None:
        self.rejected[reason] += 1
        log.warning("rejected message on %s: %s (%s)", topic, reason, detail)

    def _on_status(self, topic: str, status: Status) -> None:
        if topic != self.topics.status(status.device_id):
            self._reject("topic_mismatch", topic, f"status of {status.device_id}")
            return
        if status.state == "offline":
            self.online.discard(status.device_id)
        else:
            self.online.add(status.device_id)

    def _on_update(
        self, msg: Message, header: UpdateHeader | SkipNotice, tensors: dict[str, np.ndarray]
    ) -> None:
        rnd = self.current
        nbytes = len(msg.payload) + len(msg.topic)
        reason = self._validate(msg.topic, header, tensors)
        if reason == "duplicate":
            self._reject(reason, msg.topic, f"update {header.update_id} seen before")
            return
        self.store.record_update(
            update_id=header.update_id,
            round_id=header.round_id,
            device_id=header.device_id,
            kind=header.kind,
            num_samples=getattr(header, "num_samples", None),
            accepted=reason is None,
            reason=reason,
            nbytes=nbytes,
            received=self.clock(),
        )
        if reason is not None:
            self._reject(
                reason,
                msg.topic,
                f"{header.kind} from {header.device_id} for round {header.round_id}",
            )
            return
        assert rnd is not None
        rnd.bytes_received += nbytes
        if isinstance(header, SkipNotice):
            rnd.skipped.add(header.device_id)
            return
        rnd.deltas[header.device_id] = tensors
        rnd.counts[header.device_id] = header.num_samples
        if header.train_loss is not None:
            rnd.losses[header.device_id] = header.train_loss

    def _validate(
        self, topic: str, header: UpdateHeader | SkipNotice, tensors: dict[str, np.ndarray]
    ) -> str | None:
        rnd = self.current
        if topic != self.topics.update(header.device_id):
            return "topic_mismatch"
        if self.store.seen_update(header.update_id):
            return "duplicate"
        if rnd is None or header.round_id != rnd.round_id:
            return "wrong_round"
        if header.device_id not in rnd.selected:
            return "not_selected"
        if header.device_id in rnd.answered:
            return "already_answered"
        if isinstance(header, SkipNotice):
            return None
        if header.base_version != self.version:
            return "stale_base"
        if set(tensors) != set(self.weights) or any(
            tensors[k].shape != self.weights[k].shape for k in self.weights
        ):
            return "shape_mismatch"
        if not all(np.isfinite(t).all() for t in tensors.values()):
            return "not_finite"
        return None

    # -- rounds --------------------------------------------------------------------
    def tick(self) -> None:
        if self.done:
            return
        now = self.clock()
        rnd = self.current
        if rnd is not None:
            if rnd.answered >= set(rnd.selected):
                self._finish(now)
            elif now >= rnd.deadline:
                needed = max(1, math.ceil(self.cfg.quorum * len(rnd.selected)))
                if len(rnd.deltas) >= needed:
                    self._finish(now)
                else:
                    self._fail(now, needed)
        if self.current is None and not self.done and len(self.online) >= self.cfg.min_devices:
            self._announce(now)

    def _select(self) -> list[str]:
        online = sorted(self.online)
        k = self.cfg.devices_per_round
        if not k or k >= len(online):
            return online
        return sorted(self.rng.choice(online, size=k, replace=False).tolist())

    def _announce(self, now: float) -> None:
        selected = self._select()
        rnd = OpenRound(self.next_round_id, selected, now, now + self.cfg.round_timeout)
        self.next_round_id += 1
        self.current = rnd
        self.store.open_round(rnd.round_id, self.version, now, rnd.deadline, selected)
        t = self.cfg.training
        ann = RoundAnnouncement(
            fleet=self.cfg.fleet,
            round_id=rnd.round_id,
            model_version=self.version,
            deadline=rnd.deadline,
            selected=tuple(selected),
            config=TrainingConfig(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, mu=t.mu),
        )
        self.link.publish(self.topics.round, encode(ann), qos=1, retain=True)
        log.info(
            "round %d announced to %d device(s) on model v%d",
            rnd.round_id,
            len(selected),
            self.version,
        )

    def _publish_global(self, round_id: int) -> None:
        header = GlobalModelHeader(
            fleet=self.cfg.fleet, model_version=self.version, round_id=round_id
        )
        self.link.publish(
            self.topics.global_model, encode(header, self.weights), qos=1, retain=True
        )

    def _finish(self, now: float) -> None:
        rnd = self.current
        assert rnd is not None
        participants = sorted(rnd.deltas)
        counts = [rnd.counts[d] for d in participants]
        if participants:
            self.weights = self.strategy.step(
                self.weights, [rnd.deltas[d] for d in participants], counts
            )
            self.version += 1
            self.store.save_model(self.version, rnd.round_id, self.weights)
            self.store.save_strategy_state(self.version, self.strategy.state())
            self._publish_global(rnd.round_id)
        summary: dict = {
            "round": rnd.round_id,
            "status": "done",
            "model_version": self.version,
            "selected": len(rnd.selected),
            "participants": participants,
            "skipped": sorted(rnd.skipped),
            "missing": sorted(set(rnd.selected) - rnd.answered),
            "num_samples": int(sum(counts)),
            "train_loss": (
                float(
                    np.average(
                        [rnd.losses[d] for d in participants if d in rnd.losses],
                        weights=[rnd.counts[d] for d in participants if d in rnd.losses],
                    )
                )
                if any(d in rnd.losses for d in participants)
                else None
            ),
            "bytes_received": rnd.bytes_received,
            "duration_s": round(now - rnd.started, 3),
        }
        if self.evaluator is not None:
            loss, acc = self.evaluator(self.weights)
            summary["accuracy"], summary["loss"] = acc, loss
        self._close(rnd, "done", now, summary)
        self.completed += 1
        self._check_done()

    def _fail(self, now: float, needed: int) -> None:
        rnd = self.current
        assert rnd is not None
        log.warning(
            "round %d failed: %d of %d update(s) by the deadline, quorum %d",
            rnd.round_id,
            len(rnd.deltas),
            len(rnd.selected),
            needed,
        )
        summary = {
            "round": rnd.round_id,
            "status": "failed",
            "model_version": self.version,
            "selected": len(rnd.selected),
            "participants": sorted(rnd.deltas),
            "missing": sorted(set(rnd.selected) - rnd.answered),
            "bytes_received": rnd.bytes_received,
            "duration_s": round(now - rnd.started, 3),
        }
        self._close(rnd, "failed", now, summary)

    def _close(self, rnd: OpenRound, status: str, now: float, summary: dict) -> None:
        self.store.close_round(rnd.round_id, status, now, summary)
        self.current = None
        _append_jsonl(self.cfg.log_path, summary)
        log.info("round %d %s: %s", rnd.round_id, status, json.dumps(summary))
        self.on_round(summary)


def _append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")

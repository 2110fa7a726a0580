"""Aggregator shards: workers share the update topic, a coordinator merges their sums.

Sums are linear. Several workers subscribe to ``update/+`` through one MQTT shared
subscription (``$share/fedge-{fleet}/...``), so the broker hands each update to one of them.
A worker validates it, keeps it with its delta in its own store (as a single aggregator
does) and folds it into its running sum; the coordinator (``fedge aggregator`` with
``[shards]``) keeps the round's bookkeeping from the workers' reports and merges their sums::

    worker       update/{device} -> intake -> store + RunningSum -> shard/{w}/accepted
    coordinator  accepted -> the round's answers: quorum, deadline, skips (as unsharded)
                 the round closes -> shard/{w}/close: final weights (after sample clipping)
    worker       close -> sum_i weight_i delta_i (float64) -> shard/{w}/partial
    coordinator  sum of the partials / sum of the weights -> strategy.apply -> new global

A device that answers twice (a second update id, delivered to another worker) counts once:
the first report wins and the other worker weighs it 0; reports after the close request are
refused (``after_close``). Not sharded: chunked updates (their chunks would reach different
workers: refused as ``chunk_sharded``) and robust combiners (a config error). A worker that
restarts mid-round takes the round up from its store and reports its answers again (the
coordinator ignores what it already has); a coordinator that restarts mid-round abandons
the round, since which worker holds which update is not kept (docs/scale.md).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from fedge.protocol import (
    DEFAULT_LIMITS,
    CodecError,
    DecodeError,
    InvalidId,
    Limits,
    Link,
    Message,
    RoundAnnouncement,
    ShardAccepted,
    ShardClose,
    ShardPartial,
    SignatureError,
    SkipNotice,
    Topics,
    UpdateHeader,
    decode,
    encode,
    is_chunk,
    verify,
)
from fedge.protocol.wire import publish_size
from nacl.signing import VerifyKey

from . import intake
from .accumulate import RoundAnswers, RunningSum
from .config import AggregatorConfig, ShardsConfig
from .store import Store

if TYPE_CHECKING:
    from .coordinator import Aggregator, OpenRound

log = logging.getLogger("fedge.aggregator")

Weights = Mapping[str, np.ndarray]
# A close names every device of a worker's sum; it comes from the coordinator (the ACL's
# word), so its header may be as large as a payload.
CLOSE_LIMITS = Limits(max_header=DEFAULT_LIMITS.max_payload)


def share_group(fleet: str) -> str:
    """The shared subscription group of a fleet's workers."""
    return f"fedge-{fleet}"


class ShardWorker:
    """One shard: takes the updates the broker hands it and keeps the round's partial sum."""

    def __init__(
        self,
        config: AggregatorConfig,
        name: str,
        *,
        link: Link,
        store: Store,
        template: Weights,
        clock: Callable[[], float] = time.time,
        verify_keys: Sequence[VerifyKey] = (),
    ) -> None:
        if config.shards is None or name not in config.shards.workers:
            raise ValueError(f"worker {name!r} is not one of [shards] workers")
        self.cfg = config
        self.name = name
        self.link = link
        self.store = store
        self.clock = clock
        self.verify_keys = list(verify_keys)  # none: announcements are taken unsigned
        self.topics = Topics(config.fleet)
        self.template = {k: np.asarray(v, np.float32) for k, v in template.items()}
        self.shapes = {k: list(v.shape) for k, v in self.template.items()}
        self.announced: RoundAnnouncement | None = None
        self.round_id = 0  # the round whose sum ``acc`` holds
        self.acc = RunningSum(self.template)
        self.answered: set[str] = set()
        self.closed = False  # the coordinator closed the round: nothing more counts in it
        self.rejected: Counter[str] = Counter()
        self.accepted = 0

    def start(self, timeout: float = 30.0, *, keep_trying: bool = False) -> None:
        if keep_trying:
            self.link.connect(timeout=timeout, keep_trying=True)
        else:
            self.link.connect(timeout=timeout)
        self.link.subscribe(self.topics.shared_updates(share_group(self.cfg.fleet)), qos=1)
        self.link.subscribe(self.topics.round, qos=1)
        self.link.subscribe(self.topics.shard(self.name, "close"), qos=1)
        log.info("shard worker %s for fleet %s online", self.name, self.cfg.fleet)

    def run(self, stop: threading.Event, poll: float = 0.2) -> None:
        while not stop.is_set():
            self.step(poll)

    def step(self, timeout: float | None) -> None:
        msg = self.link.get(timeout)
        if msg is not None:
            self.handle(msg)
            self.link.ack(msg)

    def handle(self, msg: Message) -> None:
        if not msg.payload:
            return
        try:
            if msg.topic == self.topics.round:
                self._on_announcement(msg.payload)
            elif msg.topic == self.topics.shard(self.name, "close"):
                self._on_close(msg.payload)
            elif msg.topic.startswith(f"{self.topics.base}/update/"):
                self._on_update(msg)
            else:
                self.rejected["unexpected_topic"] += 1
        except (ValueError, OverflowError, sqlite3.Error) as exc:
            self._reject("internal", msg.topic, f"{type(exc).__name__}: {exc}")

    def _reject(self, reason: str, topic: str, detail: str) -> None:
        self.rejected[reason] += 1
        count = self.rejected[reason]
        if count == 1 or count % 100 == 0:
            log.warning(
                "worker %s rejected message on %s: %s (%s; %d so far)",
                self.name,
                topic,
                reason,
                detail,
                count,
            )

    def _on_announcement(self, payload: bytes) -> None:
        topic = self.topics.round
        try:
            if self.verify_keys:
                payload = verify(payload, self.verify_keys, fleet=self.cfg.fleet, kind="round")
            ann = decode(payload).msg
        except (DecodeError, SignatureError) as exc:
            self._reject(exc.reason, topic, str(exc))
            return
        if not isinstance(ann, RoundAnnouncement):
            self._reject("schema", topic, f"{ann.kind} message on the round topic")
            return
        if ann.round_id < self.round_id:
            self._reject("wrong_round", topic, f"announcement of round {ann.round_id}")
            return
        self.announced = ann
        if ann.round_id > self.round_id:
            self._open(ann.round_id)
            for answer, nbytes in self._resumed(ann):
                self._report(answer, nbytes)
        # Older rounds are closed for good: their answers are in a model, or failed.
        self.store.compact(ann.round_id - 1, keep_from_version=0)

    def _open(self, round_id: int) -> None:
        """Start the round's sum, with what this worker accepted of it before a restart."""
        self.round_id = round_id
        self.acc = RunningSum(self.template)
        self.answered = set()
        self.closed = False
        for answer in self.store.answers(round_id):
            if answer.kind == "skip":
                self._fold(answer.device_id, answer.num_samples, answer.trained, None)
            elif answer.delta is not None:
                self._fold(answer.device_id, answer.num_samples, True, answer.delta)
        if self.answered:
            log.warning(
                "worker %s took up round %d with %d answer(s) kept",
                self.name,
                round_id,
                len(self.answered),
            )

    def _resumed(self, ann: RoundAnnouncement) -> list[tuple[UpdateHeader | SkipNotice, int]]:
        """The answers kept for the announced round and their MQTT bytes, to report again
        (evaluations are not kept)."""
        out: list[tuple[UpdateHeader | SkipNotice, int]] = []
        for a in self.store.answers(ann.round_id):
            answer: UpdateHeader | SkipNotice
            if a.kind == "skip":
                answer = SkipNotice(
                    device_id=a.device_id,
                    round_id=ann.round_id,
                    update_id=a.update_id,
                    reason="resumed",
                    trained=a.trained,
                    num_samples=a.num_samples,
                )
            else:
                answer = UpdateHeader(
                    device_id=a.device_id,
                    round_id=ann.round_id,
                    update_id=a.update_id,
                    base_version=ann.model_version,
                    num_samples=a.num_samples,
                    codec=self._codec(ann),
                    train_loss=a.train_loss,
                )
            out.append((answer, publish_size(self.topics.update(a.device_id), a.nbytes, 1)))
        return out

    def _codec(self, ann: RoundAnnouncement) -> str:
        size = sum(int(np.size(w)) for w in self.template.values())
        return intake.expected_codec(ann.config.codec, ann.config.topk_min_entries, size)

    def _fold(self, device: str, n: int, trained: bool, delta: Weights | None) -> None:
        self.answered.add(device)
        if delta is not None:
            self.acc.add(device, delta, n)
        elif trained and n > 0:
            self.acc.hold(device, n)

    def _on_update(self, msg: Message) -> None:
        try:
            device = self.topics.device_of(msg.topic)
        except InvalidId:
            self._reject("topic_mismatch", msg.topic, "not an update topic")
            return
        if is_chunk(msg.payload):
            self._reject(
                "chunk_sharded",
                msg.topic,
                "chunks of one update reach different workers: with [shards], agents must"
                " send updates whole (max_payload = 0, or above the update's size)",
            )
            return
        try:
            parsed = intake.parse(msg.payload, device)
        except DecodeError as exc:
            self._reject(exc.reason, msg.topic, str(exc))
            return
        header, ann = parsed.header, self.announced
        is_open = ann is not None and ann.round_id == self.round_id and not self.closed
        reason = intake.validate(
            header,
            topic_device=device,
            round_=intake.OpenRoundView(self.round_id, ann.selected, self.answered)
            if is_open and ann is not None
            else None,
            model_version=-1 if ann is None else ann.model_version,
            seen=self.store.seen_update(header.device_id, header.update_id),
            codec=None if ann is None else self._codec(ann),
        )
        delta: dict[str, np.ndarray] | None = None
        if reason is None and isinstance(header, UpdateHeader):
            try:
                delta = intake.decode(header, parsed.tensors, self.shapes)
            except CodecError as exc:
                reason = exc.reason
        if reason is not None:
            self._reject(
                reason,
                msg.topic,
                f"{header.kind} {header.update_id} from {header.device_id}"
                f" for round {header.round_id}",
            )
            return
        trained = isinstance(header, UpdateHeader) or header.trained
        self.store.record_answer(
            device_id=header.device_id,
            update_id=header.update_id,
            round_id=header.round_id,
            kind=header.kind,
            num_samples=header.num_samples,
            trained=trained,
            train_loss=getattr(header, "train_loss", None),
            nbytes=len(msg.payload),
            received=self.clock(),
            delta=delta,
        )
        self._fold(header.device_id, header.num_samples, trained, delta)
        self.accepted += 1
        self._report(header, publish_size(msg.topic, len(msg.payload), 1))

    def _report(self, answer: UpdateHeader | SkipNotice, nbytes: int) -> None:
        report = ShardAccepted(worker=self.name, nbytes=nbytes, answer=answer)
        self.link.publish(self.topics.shard(self.name, "accepted"), encode(report), qos=1)

    def _on_close(self, payload: bytes) -> None:
        topic = self.topics.shard(self.name, "close")
        try:
            close = decode(payload, CLOSE_LIMITS).msg
        except DecodeError as exc:
            self._reject(exc.reason, topic, str(exc))
            return
        if not isinstance(close, ShardClose):
            self._reject("schema", topic, f"{close.kind} message on the close topic")
            return
        if close.round_id < self.round_id:
            self._reject("wrong_round", topic, f"close of round {close.round_id}")
            return
        if close.round_id > self.round_id:
            self._open(close.round_id)  # restarted: the close came before the announcement
        unknown = sorted(set(close.weights) - self.acc.uploaded)
        if unknown:
            # The coordinator then fails the round when its close_timeout runs out.
            log.error(
                "worker %s: round %d asks for update(s) of %s, which this worker does not hold",
                self.name,
                close.round_id,
                ", ".join(unknown),
            )
            self.rejected["close_mismatch"] += 1
            return
        self.closed = True
        used = {d: close.weights.get(d, 0) for d in self.acc.declared}
        total = self.acc.weighted_sum(
            used, lambda device: self.store.answer_delta(close.round_id, device)
        )
        tensors: dict[str, np.ndarray] = {}
        for name, value in total.items():
            hi = value.astype(np.float32)
            tensors[f"hi/{name}"] = hi
            tensors[f"lo/{name}"] = (value - hi).astype(np.float32)
        partial = ShardPartial(
            worker=self.name, round_id=close.round_id, weight=sum(close.weights.values())
        )
        self.link.publish(self.topics.shard(self.name, "partial"), encode(partial, tensors), qos=1)
        log.info(
            "worker %s: round %d partial sum of %d update(s) sent",
            self.name,
            close.round_id,
            len(close.weights),
        )


class ShardedSum(RoundAnswers):
    """A sharded round at the coordinator: which worker holds each update, then the
    workers' partial sums. Offers what a round's accumulator offers (accumulate.py)."""

    keeps_deltas = False

    def __init__(self, template: Weights) -> None:
        super().__init__()
        self.sums = {k: np.zeros(np.shape(w), np.float64) for k, w in template.items()}
        self.reported: dict[str, tuple[str, str]] = {}  # device -> (worker, update id)
        self.requested: dict[str, int] | None = None  # the final weights, once closing
        self.expected: dict[str, int] = {}  # worker -> the weight its partial sum must carry
        self.waiting: set[str] = set()  # workers whose partial sum is not in yet
        self.close_by = 0.0

    def add(self, device: str, delta: Weights, n: int) -> None:
        """An update a worker accepted, with its declared weight (its delta stays there)."""
        self._enter(device, n, uploaded=True)

    def mean(
        self, used: Mapping[str, int], fetch: Callable[[str], Weights], combiner: object
    ) -> dict[str, np.ndarray]:
        """The merged partial sums over the total weight (``fetch`` and ``combiner``
        unused: the workers applied the weights, and only the plain mean shards)."""
        if self.requested != dict(used) or self.waiting:
            raise ValueError("the partial sums are not those of the round's final weights")
        total = float(sum(used.values()))
        if total <= 0:
            raise ValueError("sample counts must add up to more than zero")
        return {k: a / total for k, a in self.sums.items()}


class Shards:
    """The coordinator's side: reports in, close requests out, partial sums in."""

    def __init__(self, config: ShardsConfig, topics: Topics, link: Link, template: Weights) -> None:
        self.cfg = config
        self.topics = topics
        self.link = link
        self.shapes = {k: tuple(np.shape(w)) for k, w in template.items()}
        self.head = f"{topics.base}/shard/"

    def subscribe(self) -> None:
        self.link.subscribe(self.topics.shard("+", "accepted"), qos=1)
        self.link.subscribe(self.topics.shard("+", "partial"), qos=1)

    def owns(self, topic: str) -> bool:
        return topic.startswith(self.head)

    def accumulator(self) -> ShardedSum:
        return ShardedSum({k: np.zeros(s) for k, s in self.shapes.items()})

    def handle(self, agg: Aggregator, msg: Message) -> None:
        worker, _, what = msg.topic[len(self.head) :].partition("/")
        if worker not in self.cfg.workers:
            agg._reject("unknown_worker", msg.topic, f"worker {worker!r} is not in [shards]")
            return
        try:
            decoded = decode(msg.payload)
        except DecodeError as exc:
            agg._reject(exc.reason, msg.topic, str(exc))
            return
        report = decoded.msg
        if what == "accepted" and isinstance(report, ShardAccepted) and report.worker == worker:
            self._accepted(agg, msg.topic, report)
        elif what == "partial" and isinstance(report, ShardPartial) and report.worker == worker:
            self._partial(agg, msg.topic, report, decoded.tensors)
        else:
            agg._reject("schema", msg.topic, f"{report.kind} message from worker {worker}")

    def _accepted(self, agg: Aggregator, topic: str, report: ShardAccepted) -> None:
        rnd, answer = agg.current, report.answer
        what = f"{answer.kind} {answer.update_id} of {answer.device_id} from {report.worker}"
        if rnd is None or answer.round_id != rnd.round_id:
            agg._reject("wrong_round", topic, f"{what} for round {answer.round_id}")
            return
        acc = _sharded(rnd)
        if acc.requested is not None:
            agg._reject("after_close", topic, f"{what}: round {rnd.round_id} is closing")
            return
        device = answer.device_id
        if device in rnd.answered:
            if acc.reported.get(device) != (report.worker, answer.update_id):
                agg._reject("already_answered", topic, what)
            return  # else a restarted worker reporting it again
        if device not in rnd.selected:
            agg._reject("not_selected", topic, what)
            return
        acc.reported[device] = (report.worker, answer.update_id)
        rnd.wire_up[device] += report.nbytes
        if answer.evaluation is not None:
            rnd.evals[device] = answer.evaluation
        if isinstance(answer, SkipNotice):
            agg._take_skip(rnd, answer)
            return
        acc.add(device, {}, answer.num_samples)
        rnd.counts[device] = answer.num_samples
        if answer.train_loss is not None:
            rnd.losses[device] = answer.train_loss

    def merged(self, agg: Aggregator, rnd: OpenRound, used: Mapping[str, int], now: float) -> bool:
        """True once every partial sum of the round is in. The first call sends each worker
        that holds a counted update its close request; after ``close_timeout`` without all
        of them the round fails."""
        acc = _sharded(rnd)
        if not acc.uploaded:
            return True
        if acc.requested is None:
            acc.requested = dict(used)
            weights: dict[str, dict[str, int]] = {}
            for device in sorted(acc.uploaded):
                weights.setdefault(acc.reported[device][0], {})[device] = used[device]
            for worker, mine in sorted(weights.items()):
                close = ShardClose(round_id=rnd.round_id, weights=mine)
                self.link.publish(self.topics.shard(worker, "close"), encode(close), qos=1)
            acc.expected = {w: sum(mine.values()) for w, mine in weights.items()}
            acc.waiting = set(weights)
            acc.close_by = now + self.cfg.close_timeout
            log.info(
                "round %d closing: partial sums asked of %s",
                rnd.round_id,
                ", ".join(sorted(weights)),
            )
            return False
        if not acc.waiting:
            return True
        if now >= acc.close_by:
            agg._fail(
                now,
                f"no partial sum from worker(s) {', '.join(sorted(acc.waiting))}"
                f" within {self.cfg.close_timeout:g} s",
            )
        return False

    def _partial(
        self, agg: Aggregator, topic: str, partial: ShardPartial, tensors: Mapping[str, np.ndarray]
    ) -> None:
        rnd = agg.current
        acc = None if rnd is None else _sharded(rnd)
        if rnd is None or acc is None or partial.round_id != rnd.round_id:
            agg._reject("stray_partial", topic, f"partial sum for round {partial.round_id}")
            return
        if partial.worker not in acc.waiting:
            agg._reject("stray_partial", topic, f"partial sum of {partial.worker} not asked for")
            return
        want = {f"{half}/{k}": s for k, s in self.shapes.items() for half in ("hi", "lo")}
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        if partial.weight != acc.expected[partial.worker] or shapes != want:
            # Not merged: the round fails when its close_timeout runs out.
            agg._reject(
                "bad_partial",
                topic,
                f"weight {partial.weight} (asked {acc.expected[partial.worker]}) or tensors"
                " other than the model's",
            )
            return
        for name, total in acc.sums.items():
            total += np.asarray(tensors[f"hi/{name}"], np.float64)
            total += np.asarray(tensors[f"lo/{name}"], np.float64)
        acc.waiting.discard(partial.worker)


def _sharded(rnd: OpenRound) -> ShardedSum:
    if not isinstance(rnd.acc, ShardedSum):
        raise TypeError(f"round {rnd.round_id} is not sharded")
    return rnd.acc

"""The device daemon's loop: one thread owns the state; messages arrive through a queue.

The link's network thread only enqueues (see DESIGN.md, Concurrency). This loop takes
a message, and on a round announcement that selects this device it trains on the
global model named by the announcement and publishes the weight delta::

    retained global  -> remember weights + version
    round(selected)  -> set_weights(global); train E epochs; publish delta, n
"""

from __future__ import annotations

import logging
import re
import secrets
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from fedge.models.runtime import Runtime
from fedge.protocol import (
    DecodeError,
    EncodeError,
    Evaluation,
    GlobalDeltaHeader,
    GlobalModelHeader,
    Link,
    LinkError,
    Message,
    RoundAnnouncement,
    SignatureError,
    SkipNotice,
    Status,
    Topics,
    TrainingConfig,
    UpdateHeader,
    decode,
    encode,
    encode_skip,
    is_signed,
    parse_codec,
    split,
    verify,
)
from fedge.protocol.downlink import DeltaMismatch, apply_delta, checksum
from fedge.protocol.envelope import is_encrypted
from fedge.protocol.messages import HE_CODEC, MAX_READINGS
from fedge.protocol.signing import OVERHEAD as SIGNATURE_OVERHEAD
from fedge.protocol.signing import key_id
from fedge.protocol.status import encode_status
from fedge.protocol.wire import publish_size
from nacl.signing import VerifyKey
from pydantic import ValidationError

from fedge import __version__

from . import evaluation, he_model
from . import update as steps
from .dataset import Dataset
from .eligibility import ByteBudget, Decision
from .gate import GateDecision
from .outbox import Outbox, Pending
from .residual import ResidualStore
from .state import AgentState
from .tasks import TaskError
from .trainer import train_local

if TYPE_CHECKING:  # imported where used: a device loads them for a secure or HE round only
    from fedge.protocol.he import HeKeys

    from .secure import SecureTurn

log = logging.getLogger("fedge.agent")

TRAINING_NOTE_AFTER = 1.0  # seconds of training before the status says "training"
STATUS_GRACE = 0.5  # seconds the status after a model waits for the round that makes it moot
# The kinds a quiet device's inbox carries, most frequent first (each message is signed as
# for its broadcast topic): model deltas, round announcements, whole models.
INBOX_KINDS = ("global_delta", "round", "global")
# Skips the upload gate decides: the device's data adds little now, so a quiet device rests.
GATE_REASONS = ("small_update", "irrelevant")


@dataclass
class AgentStats:
    rounds_trained: int = 0
    models_applied: int = 0
    failed: int = 0  # rounds that could not be answered (diverged, encode errors)
    bytes_sent: int = 0  # MQTT bytes of updates and skip notices
    rejected: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)  # rounds sat out, by reason
    # What kept the device from part of its work, by kind: "data" (the training data cannot
    # be read), "anomaly_score", "disk" (a file the agent keeps cannot be written).
    faults: Counter[str] = field(default_factory=Counter)


def _label(key: object) -> str:
    """A counter's name as a status label: [a-z0-9_], at most 32 characters."""
    return re.sub(r"[^a-z0-9_]", "_", str(key).lower())[:32] or "_"


class DayCounter:
    """Bytes since local midnight (or since the start, on the first day), from running totals."""

    def __init__(self) -> None:
        self._day: tuple[int, int, int] | None = None
        self._base = (0, 0)

    def today(self, now: float, up: int, down: int) -> tuple[int, int]:
        day = time.localtime(now)[:3]
        if self._day is None:
            self._day = day
        elif day != self._day:
            self._day, self._base = day, (up, down)
        return up - self._base[0], down - self._base[1]


class Agent:
    """One device. ``link`` is connected by :meth:`start`; :meth:`run` loops until stopped."""

    def __init__(
        self,
        *,
        device_id: str,
        fleet: str,
        link: Link,
        runtime: Runtime,
        data: Dataset | Callable[[], Dataset],
        state: AgentState | None = None,
        save_state: Callable[[AgentState], None] | None = None,
        note_state: Callable[[AgentState], None] | None = None,
        rng: np.random.Generator | None = None,
        clock: Callable[[], float] = time.time,
        on_trained: Callable[[int, dict[str, np.ndarray]], None] | None = None,
        residual_store: ResidualStore | None = None,
        eligibility: Callable[[int], Decision] | None = None,
        budget: ByteBudget | None = None,
        max_payload: int = 0,
        sensor: Any = None,
        trusted_keys: Sequence[VerifyKey] = (),
        outbox: Outbox | None = None,
        readings: Callable[[], dict[str, float]] | None = None,
        noise_rng: np.random.Generator | None = None,
        he_keys: HeKeys | None = None,
        quiet: bool = False,
        rest_rounds: int = 0,
    ) -> None:
        self.device_id = device_id
        self.topics = Topics(fleet)
        self.link = link
        self.runtime = runtime
        # A fixed data set, or a callable that builds one from the sensor when a round starts
        # (and raises TaskError while there are too few samples).
        self.data = data
        self._round_data: Dataset | None = data if isinstance(data, Dataset) else None
        self.state = state or AgentState()
        self._save_state = save_state or (lambda s: None)
        # A quick save without an fsync (survives the process, not a power cut), for the
        # model version between the durable saves; None: none.
        self._note_state = note_state
        # How often the state was saved: one durable write each, of the state file or of an
        # outbox holding the state with its answer.
        self._saves = 0
        # A model applied is saved durably with the next state save (the round that follows,
        # or the next idle moment), not on its own: that fsync sat between the model's
        # arrival and the device's answer, on every round's critical path. Until then a
        # quick save (``note_state``) keeps the version across a crash of the process; a
        # power cut in between forgets it, and an older model is taken once more.
        self._unsaved = False
        # The faults going on (``_fault``), by kind: what was logged, so that it is said
        # again only when it changes.
        self._faults: dict[str, str] = {}
        self.stats = AgentStats()
        self.rng = rng or np.random.default_rng()
        # Local DP noise draws from the OS's entropy, never from ``rng``: a seed in a config
        # file would let anyone who reads it subtract the noise again.
        self.noise_rng = noise_rng or np.random.default_rng()
        # Homomorphic encryption: the fleet's CKKS secret key (agent/he_model.py); None: off.
        self.he_keys = he_keys
        # Quiet: listen only on inbox/{device}, where the aggregator sends the rounds this
        # device is selected for and the model they need; a gate skip then rests
        # ``rest_rounds`` rounds (docs/bandwidth.md, Quiet devices).
        self.quiet = quiet
        self.rest_rounds = rest_rounds if quiet else 0
        self.clock = clock
        # Called with (round id, local weights) after local training, before the upload:
        # field tests use it to score each device's own model; a device needs nothing here.
        self.on_trained = on_trained
        # What the codec or the gate held back, sent with a later update (error feedback).
        self._residual_store = residual_store
        self.residual = residual_store.load(runtime.get_weights()) if residual_store else None
        # Asked before training and before uploading, with the expected upload size.
        self.eligibility = eligibility
        self.budget = budget
        self.max_payload = max_payload  # 0: never chunk
        self.sensor = sensor  # a SensorSource to start and stop with the agent, if any
        # The aggregator's public keys: rounds and global models must carry a signature by
        # one of them. Empty: unsigned ones are taken (development only; logged at start).
        self.trusted_keys = tuple(trusted_keys)
        self.outbox = outbox  # an update on its way; sent again after a crash
        # The outbox's answer went again at start: the outbox goes once the broker has it.
        self._resent = False
        self._check_trust_root()
        # What the device reads about itself (battery, temperature, load), for the status.
        self.readings = readings
        # Called with each status published (the service shows it to systemd).
        self.on_status: Callable[[Status], None] | None = None
        self.outcome: tuple[str, str | None] | None = None  # last round: sent/skipped/failed
        self.last_train_loss: float | None = None
        self._started = time.monotonic()
        self._day = DayCounter()
        self.anomaly_score: float | None = None  # autoencode: latest window vs global model
        self.heartbeat: Callable[[], None] | None = None  # called during long work
        # The status after a model is applied waits a moment (``STATUS_GRACE``) for the next
        # message: the round that names the model comes right after it, and the statuses of
        # that round carry the same version (and score). One status a round instead of two,
        # here and at the aggregator; an unselected device says it half a second later.
        self._status_due = False
        # Training says "training" once it has lasted this long (seconds): a round of a
        # small model is over before anyone could read it, and its "idle" follows at once.
        self.training_note_after = TRAINING_NOTE_AFTER
        self._training_since: float | None = None
        self.last_update_bytes = 0
        self.last_gate: GateDecision | None = None
        self.last_global_update: dict[str, np.ndarray] | None = None
        self.global_weights: dict[str, np.ndarray] | None = None
        self.global_version = -1
        # The global model version the runtime holds as it was applied (None: other weights,
        # e.g. after training): a round right after its model need not set it again.
        self._runtime_holds: int | None = None
        self.pending: RoundAnnouncement | None = None
        # This device's part in the secure round that is open (docs/secure-aggregation.md).
        self.secure: SecureTurn | None = None
        self._secagg_subscribed = False
        # Whether it listens to every round (the broadcast topics): one that is not quiet
        # always, a quiet one until its inbox has brought a message (start).
        self.listening = False

    def _check_trust_root(self) -> None:
        """Rounds and versions seen under other keys do not bind this device.

        Under a new trust root (keys pinned for the first time, e.g. after an upgrade from
        unsigned rounds, or keys none of which were pinned before) a forged round id or model
        version remembered from before would make it refuse every real round for good, and
        so would the outbox's answer, which would bring its round id back when it is sent
        again: it is dropped first. Rotation (old and new key pinned together) keeps what was
        seen.
        """
        if not self.trusted_keys:
            return
        ids = sorted(key_id(key).hex() for key in self.trusted_keys)
        before = set(self.state.trusted_keys or ())
        if before & set(ids):
            if before != set(ids):
                self.state.trusted_keys = ids
                self._save(self.state)
            return
        if self.state.round_seen or self.state.last_round or self.state.model_version >= 0:
            log.warning(
                "new aggregator key(s) %s pinned: forgetting round %d and model v%d seen before",
                ",".join(ids),
                self.state.round_seen,
                self.state.model_version,
            )
        pending = None if self.outbox is None else self.outbox.take()
        if pending is not None:
            self._drop(pending)  # before the state that forgets its round is saved
        self.state.last_round = self.state.round_seen = 0
        self.state.model_version = -1
        self.state.trusted_keys = ids
        self._save(self.state)

    def _untrusted(self, pending: Pending) -> bool:
        """Whether the outbox's answer was written under keys none of which is pinned now (a
        crash, or a full disk, kept it past ``_check_trust_root``)."""
        if not self.trusted_keys or pending.state is None:
            return False
        return not set(pending.state.trusted_keys or ()) & set(self.state.trusted_keys or ())

    def _drop(self, pending: Pending) -> None:
        """Forget the outbox's answer, for a round under another trust root: not sent again,
        its round not taken in. Its residual is the residual since, and stays."""
        assert self.outbox is not None
        log.warning(
            "dropping the %s %s for round %d: written under aggregator keys no longer pinned",
            pending.kind,
            pending.update_id,
            pending.round_id,
        )
        try:
            self._hold(pending.kept, durable=True)
            self.outbox.clear()
        except OSError as exc:
            self._fault("disk", exc, "cannot drop the outbox (it is not sent)")

    @staticmethod
    def birth(device_id: str, fleet: str, *, quiet: bool = False) -> Message:
        """What the link publishes on every reconnect, replacing the Will's "offline"."""
        status = Status(device_id=device_id, state="online", timestamp=0.0, quiet=quiet)
        payload = encode_status(status)
        return Message(Topics(fleet).status(device_id), payload, retain=True)

    @staticmethod
    def will(device_id: str, fleet: str) -> Message:
        """The Last Will the broker publishes if this device vanishes."""
        payload = encode_status(Status(device_id=device_id, state="offline", timestamp=0.0))
        return Message(Topics(fleet).status(device_id), payload, retain=True)

    def start(self, timeout: float = 30.0, *, keep_trying: bool = False) -> None:
        """Connect and subscribe; with ``keep_trying`` a broker that is not up yet is waited
        for in the background (the service's case) instead of raising."""
        if self.sensor is not None:
            self.sensor.start()
        if keep_trying:
            self.link.connect(timeout=timeout, keep_trying=True)
        else:
            self.link.connect(timeout=timeout)
        if self.quiet:
            inbox = self.topics.inbox(self.device_id)
            try:
                self.link.subscribe(inbox, qos=1)
            except LinkError as exc:
                # A broker ACL from before quiet devices: listen to every round instead.
                log.warning("cannot be quiet, listening to every round: %s", exc)
                self.quiet, self.rest_rounds = False, 0
            else:
                # The broker keeps a session's subscriptions: those of a secure round in a
                # run that was not quiet would go on waking this device.
                self.link.unsubscribe(self.topics.secagg(self.device_id))
                self.link.unsubscribe(self.topics.secagg_all)
                # A granted subscription does not show that the broker delivers there:
                # Mosquitto grants one its ACL denies (MQTT 3.1.1) and then sends nothing,
                # and a refusal that comes on a reconnect is only logged. Every round is
                # listened to until the inbox brings a message (_inbox_works); the statuses
                # say so (``listening``), and the aggregator then sends every round to the
                # inbox too, selected or not, so that the first comes within a round.
                log.info("listening to every round until the first message on %s", inbox)
        self._listen()
        self._status("online")
        self.resend_interrupted()
        if not self.trusted_keys:
            log.warning(
                "no aggregator key pinned (aggregator_keys): rounds and global models are not"
                " authenticated, anyone who can publish on the broker can replace them"
            )
        log.info(
            "agent %s online in fleet %s, %d local samples, runtime %s",
            self.device_id,
            self.topics.fleet,
            len(self._round_data) if self._round_data is not None else 0,
            self.runtime.describe(),
        )

    def _listen(self) -> None:
        """Subscribe to the fleet's broadcast topics: every round and every global model."""
        self.link.subscribe(self.topics.global_model, qos=1)
        try:
            self.link.subscribe(self.topics.global_delta, qos=1)
        except LinkError as exc:
            # A broker ACL from before compact globals: full models only (asked for when a
            # round names a version this device lacks).
            log.warning("no compact globals: %s", exc)
        self.link.subscribe(self.topics.round, qos=1)
        self.listening = True

    def _inbox_works(self) -> None:
        """A message came on this device's inbox: the broker delivers there, so a quiet
        device stops listening to every round (its secure round's topics stay)."""
        if not (self.quiet and self.listening):
            return
        self.listening = False
        for topic in (self.topics.global_model, self.topics.global_delta, self.topics.round):
            self.link.unsubscribe(topic)
        # Its statuses said it listens: until one says otherwise the aggregator sends it the
        # rounds that do not select it as well (each would wake it), and counts it awake.
        self._status_due = True
        log.info("%s works: quiet now", self.topics.inbox(self.device_id))

    def stop(self) -> None:
        try:
            if self._unsaved:
                self._save(self.state)
            self._status("offline")
        finally:
            self.link.close()  # waits a moment for the broker's acks
            self._forget_resent()
            if self.sensor is not None:
                self.sensor.stop()

    def run(self, stop: threading.Event, poll: float = 0.5) -> None:
        while not stop.is_set():
            self.step(poll)

    def step(self, timeout: float | None) -> bool:
        """Handle at most one message; returns whether one arrived."""
        wait = timeout
        if self._status_due:
            wait = STATUS_GRACE if timeout is None else min(timeout, STATUS_GRACE)
        msg = self.link.get(wait)
        if msg is None and self._status_due:  # nothing came: say what was applied
            self._status("idle")
            msg = self.link.get(timeout)
        if msg is None:
            if self._unsaved:  # idle: the model applied without a round after it
                self._save(self.state)
            self._forget_resent()
            return False
        self.handle(msg)
        return True

    def _save(self, state: AgentState) -> bool:
        """Write the state file; False when the disk refuses (full, or failing): the state
        stays in memory, and the next idle moment tries again. Never a crash: the retained
        round or model would bring the same write back after a restart."""
        self._saves += 1
        try:
            self._save_state(state)
        except OSError as exc:
            self._unsaved = True
            self._fault("disk", exc, "cannot save the agent's state (tried again when idle)")
            return False
        self._unsaved = False
        self._fault_over("disk")
        return True

    def _fault(self, kind: str, exc: BaseException, doing: str) -> None:
        """Count a fault that keeps the device from part of its work (``AgentStats.faults``);
        log it at ERROR when it starts or changes, not every time it recurs."""
        self.stats.faults[kind] += 1
        what = f"{type(exc).__name__}: {exc}"
        if self._faults.get(kind) != what:
            self._faults[kind] = what
            log.error("%s: %s", doing, what)

    def _fault_over(self, kind: str) -> None:
        if self._faults.pop(kind, None) is not None:
            log.info("fault over: %s", kind)

    def _status(self, state: str, *, behind: bool = False) -> None:
        self._status_due = False  # this one says it too
        now = self.clock()
        up, down = self._day.today(now, self.link.bytes_up, self.link.bytes_down)
        outcome, reason = self.outcome or (None, None)
        status = Status(
            device_id=self.device_id,
            state=state,
            timestamp=now,
            anomaly_score=self.anomaly_score,
            model_version=self.global_version,
            # Only when a round names a model this device lacks: the aggregator then sends it
            # again. Not otherwise: at start the retained copy is on its way, and after an
            # upload the aggregator may already have moved on; either would make it resend
            # the model to every device.
            wants_model=behind,
            last_round=self.state.last_round or None,
            outcome=outcome,
            skip_reason=reason,
            train_loss=self.last_train_loss,
            readings=self._readings(),
            bytes_up_today=up,
            bytes_down_today=down,
            sensor=self._sensor_counters(),
            store_bytes=getattr(self.sensor, "store_bytes", None),
            agent_version=__version__,
            uptime_s=round(time.monotonic() - self._started, 1),
            quiet=self.quiet,
            listening=self.quiet and self.listening,
        )
        self.link.publish(
            self.topics.status(self.device_id), encode_status(status), qos=1, retain=True
        )
        if self.on_status is not None:
            self.on_status(status)

    def _training_step(self) -> None:
        """After each batch: the watchdog, and "training" once the round takes long."""
        if self.heartbeat is not None:
            self.heartbeat()
        since = self._training_since
        if since is not None and time.perf_counter() - since >= self.training_note_after:
            self._training_since = None
            self._status("training")

    def _readings(self) -> dict[str, float]:
        if self.readings is None:
            return {}
        return {k: v for k, v in self.readings().items() if np.isfinite(v)}

    def _sensor_counters(self) -> dict[str, int]:
        if self.sensor is None:
            return {}
        counts = {_label(k): int(v) for k, v in self.sensor.counters.items()}
        return dict(sorted(counts.items())[:MAX_READINGS])

    def handle(self, msg: Message) -> None:
        if not msg.payload:  # a cleared retained message
            return
        if msg.topic == self.topics.global_model:
            kind = "global"
        elif msg.topic == self.topics.global_delta:
            kind = "global_delta"
        elif msg.topic == self.topics.round:
            kind = "round"
        elif msg.topic in (self.topics.secagg(self.device_id), self.topics.secagg_all):
            kind = "secagg"
        elif msg.topic == self.topics.inbox(self.device_id):
            kind = "inbox"  # one of the broadcast kinds, sent to this device alone
            self._inbox_works()
        else:
            # Some brokers (amqtt) also hand over retained messages of other topics.
            self.stats.rejected["unexpected_topic"] += 1
            log.debug("ignored message on %s", msg.topic)
            return
        payload = msg.payload
        inbox = kind == "inbox"
        try:
            if inbox:
                kind, payload = self._inbox(payload)
            elif self.trusted_keys:
                payload = verify(payload, self.trusted_keys, fleet=self.topics.fleet, kind=kind)
            elif is_signed(payload):  # nothing pinned to check it with (development)
                payload = payload[SIGNATURE_OVERHEAD:]
            if kind == "secagg":
                self._on_secagg(msg.topic, payload)
                return
            decoded = decode(payload)
        except (SignatureError, DecodeError) as exc:
            self._refuse(exc.reason, msg.topic, str(exc))
            return
        header = decoded.msg
        if inbox and not self.trusted_keys:  # nothing to check the kind with: the header's
            kind = {"global": "global", "global_delta": "global_delta"}.get(header.kind, "round")
        if isinstance(header, (GlobalModelHeader, GlobalDeltaHeader, RoundAnnouncement)) and (
            header.fleet != self.topics.fleet
        ):
            self._refuse("other_fleet", msg.topic, f"{header.kind} of fleet {header.fleet}")
        elif isinstance(header, GlobalModelHeader) and kind == "global":
            self._on_global(header, decoded.tensors)
        elif isinstance(header, GlobalDeltaHeader) and kind == "global_delta":
            self._on_global_delta(header, decoded.tensors)
        elif isinstance(header, RoundAnnouncement) and kind == "round":
            self._on_round_announced(header)
        else:
            self._refuse("unexpected", msg.topic, f"{header.kind} message")

    def _inbox(self, payload: bytes) -> tuple[str, bytes]:
        """The kind and envelope of a message on this device's inbox: it is signed as for its
        broadcast topic (round, global_delta or global), and must verify as one of them.
        With no key pinned (development) the kind is the header's, read by ``handle``."""
        if not self.trusted_keys:
            return "inbox", payload[SIGNATURE_OVERHEAD:] if is_signed(payload) else payload
        failure: SignatureError | None = None
        for kind in INBOX_KINDS:
            try:
                return kind, verify(payload, self.trusted_keys, fleet=self.topics.fleet, kind=kind)
            except SignatureError as exc:
                if exc.reason != "bad_signature":
                    raise  # unsigned, or by a key not pinned: no other kind will do
                failure = exc
        assert failure is not None
        raise failure

    def _refuse(self, reason: str, topic: str, detail: str) -> None:
        """Count a refused message; log the first of each reason, then every 100th."""
        self.stats.rejected[reason] += 1
        count = self.stats.rejected[reason]
        if count == 1 or count % 100 == 0:
            log.warning("refused message on %s: %s (%s; %d so far)", topic, reason, detail, count)

    def _on_round_announced(self, ann: RoundAnnouncement) -> None:
        if ann.round_id < self.state.round_seen:
            self._refuse(
                "old_round",
                self.topics.round,
                f"round {ann.round_id} announced after round {self.state.round_seen}",
            )
            return
        if ann.round_id > self.state.round_seen:
            self.state.round_seen = ann.round_id
            saves = self._saves
            self._on_round(ann)
            if self._saves == saves:  # not answered now (not selected, or waiting for a model)
                self._save(self.state)
            return  # answered: the commit saved round_seen with the answer, one write for both
        self._on_round(ann)

    def _on_global_delta(self, header: GlobalDeltaHeader, tensors: dict[str, np.ndarray]) -> None:
        """Compact globals (``fedge.protocol.downlink``): the change from the model this
        device holds to the next. One for another base version is skipped (the device asks
        for the whole model when a round names a version it lacks)."""
        if header.model_version <= self.global_version:
            return  # the retained copy again, or a version it has
        if self.global_weights is None or header.base_version != self.global_version:
            self.stats.rejected["delta_gap"] += 1
            log.info(
                "model v%d comes as a change to v%d; this device has v%d: it waits for the"
                " whole model",
                header.model_version,
                header.base_version,
                self.global_version,
            )
            return
        try:
            weights = apply_delta(self.global_weights, header, tensors)
        except DeltaMismatch as exc:
            self._refuse(exc.reason, self.topics.global_delta, str(exc))
            return
        self._on_global(
            GlobalModelHeader(
                fleet=header.fleet, model_version=header.model_version, round_id=header.round_id
            ),
            weights,
        )

    def _on_global(self, header: GlobalModelHeader, tensors: dict[str, np.ndarray]) -> None:
        newest = max(self.global_version, self.state.model_version)
        if header.model_version < newest:
            self._refuse(
                "old_version",
                self.topics.global_model,
                f"model v{header.model_version} after v{newest}",
            )
            return
        if header.model_version == self.global_version and self._holds(tensors):
            return  # the retained copy again (a reconnect)
        # (The same version with other bits: the aggregator's whole copy replaces one rebuilt
        # from compact deltas, after it restarted or sent the model again on request.)
        if is_encrypted(tensors):  # homomorphic encryption: decrypt (agent/he_model.py) ...
            from fedge.protocol.he import HeError

            try:
                tensors = he_model.open_global(self.he_keys, tensors, self.runtime.get_weights())
            except HeError as exc:
                self._refuse(f"he_{exc.reason}", self.topics.global_model, str(exc))
                return  # ... then checked as any model
        elif self.he_keys is not None:
            detail = "a plain global model; with [he] key_file this device takes encrypted ones"
            self._refuse("he_plain_model", self.topics.global_model, detail)
            return
        if not all(np.isfinite(t).all() for t in tensors.values()):
            self._refuse("not_finite", self.topics.global_model, f"model v{header.model_version}")
            return
        self._runtime_holds = None
        try:
            self.runtime.set_weights(tensors)
        except ValueError as exc:
            self.stats.rejected["model_mismatch"] += 1
            log.error(
                "global model v%d does not fit the local model: %s", header.model_version, exc
            )
            return
        new = {k: np.array(v, dtype=np.float32) for k, v in tensors.items()}
        if self.global_weights is not None and header.model_version == self.global_version + 1:
            self.last_global_update = {k: new[k] - self.global_weights[k] for k in new}
        self.global_weights = new
        self.global_version = header.model_version
        self._runtime_holds = header.model_version
        self.stats.models_applied += 1
        self.state.model_version = header.model_version
        self._unsaved = True
        if self._note_state is not None:
            try:
                self._note_state(self.state)
            except OSError as exc:  # a quick note only: the next state save holds it too
                self._fault("disk", exc, "cannot note the model version")
        log.info("applied global model v%d (round %d)", header.model_version, header.round_id)
        if self.sensor is not None:
            try:
                score = self.sensor.anomaly_score(self.runtime)
            except (RuntimeError, ValueError) as exc:
                # The model stays applied whatever the latest samples make of the score: a
                # store that cannot be read (StoreError), a window of another channel count.
                self._fault("anomaly_score", exc, f"no anomaly score under v{header.model_version}")
                score = None
            else:
                self._fault_over("anomaly_score")
            if score is not None and np.isfinite(score):
                self.anomaly_score = score
                log.info("anomaly score %.4f under model v%d", score, header.model_version)
        self._status_due = True  # the model it holds now (and the score under it), see step
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._on_round(pending)

    def _holds(self, tensors: dict[str, np.ndarray]) -> bool:
        held = self.global_weights
        return (
            held is not None
            and held.keys() == tensors.keys()
            and all(np.array_equal(held[k], tensors[k]) for k in held)
        )

    def _on_round(self, ann: RoundAnnouncement) -> None:
        if self.secure is not None and self.secure.round_id != ann.round_id:
            self._leave_secure(abort=True)  # a new round: the secure one it was in is over
        if self.device_id not in ann.selected or ann.round_id <= self.state.last_round:
            return
        if self.secure is not None:
            return  # taking part already (the retained announcement again, on a reconnect)
        if ann.deadline < self.clock():
            log.info("round %d: deadline already passed, sitting out", ann.round_id)
            return
        if ann.config.he != (self.he_keys is not None):  # HE (agent/he_model.py)
            log.warning(he_model.NO_KEY if ann.config.he else he_model.PLAIN_ROUND, ann.round_id)
            self._skip(
                ann, he_model.SKIP_NO_KEY if ann.config.he else he_model.SKIP_PLAIN, trained=False
            )
            return
        if (
            self.global_version < ann.model_version
            and self.global_weights is None
            and ann.model_checksum is not None
            and ann.model_version >= self.state.model_version
            and checksum(self.runtime.get_weights()) == ann.model_checksum
        ):
            # Compact globals: the model the round names is the one this device was
            # installed with (checked by the signed announcement's checksum): nothing to fetch.
            local = self.runtime.get_weights()
            log.info("round %d: model v%d is the installed model", ann.round_id, ann.model_version)
            self._on_global(
                GlobalModelHeader(fleet=ann.fleet, model_version=ann.model_version, round_id=0),
                local,
            )
        if self.global_version < ann.model_version:
            # The global model it names has not arrived yet: wait for it, and say which
            # version this device has, so the aggregator sends it again if it was lost.
            if self.pending is None or self.pending.round_id != ann.round_id:
                self._status("idle", behind=True)
            self.pending = ann
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

    def _parts(self, payload: bytes, update_id: str) -> list[bytes]:
        """The publishes an update takes: itself, or chunks when it exceeds ``max_payload``."""
        if self.max_payload and len(payload) > self.max_payload:
            return split(payload, self.max_payload, bytes.fromhex(update_id))
        return [payload]

    def _wire_size(self, parts: list[bytes]) -> int:
        topic = self.topics.update(self.device_id)
        return sum(publish_size(topic, len(part), 1) for part in parts)

    def _skip(
        self,
        ann: RoundAnnouncement,
        reason: str,
        *,
        trained: bool,
        held: dict[str, np.ndarray] | None = None,
        scored: Evaluation | None = None,
        outcome: str = "skipped",
    ) -> None:
        """Send a skip notice; ``held``: the update a device that trained holds back (it
        becomes the residual, through the outbox like an upload); ``scored``: its evaluation
        of the global model. Then the status says so."""
        notice = SkipNotice(
            device_id=self.device_id,
            round_id=ann.round_id,
            update_id=secrets.token_hex(8),
            reason=reason,
            trained=trained,
            num_samples=len(self._round_data) if trained and self._round_data is not None else 0,
            evaluation=scored,
            # A quiet device whose update is not worth sending rests: its radio sleeps
            # through the next rounds (the gate's staleness bound still applies after them).
            rest=self.rest_rounds if reason in GATE_REASONS else 0,
        )
        payload = encode_skip(notice)
        topic = self.topics.update(self.device_id)
        self._sent(publish_size(topic, len(payload), 1))
        if held is not None and self.outbox is not None:
            after = self._answered(ann.round_id, "skip")
            self._keep(
                Pending(ann.round_id, notice.update_id, topic, [payload], held, "skip", after)
            )
        self.link.publish(topic, payload, qos=1)
        self.stats.skipped[reason] += 1
        self.outcome = (outcome, reason)
        if held is not None:
            self._commit(ann.round_id, held, kind="skip")
        else:
            self.state.last_round = max(self.state.last_round, ann.round_id)
            self._save(self.state)
        log.info(
            "round %d: sat out (%s); skip notice sent%s",
            ann.round_id,
            reason,
            f", resting {notice.rest} round(s)" if notice.rest else "",
        )
        self._status("idle")

    def _sent(self, nbytes: int) -> None:
        self.stats.bytes_sent += nbytes
        if self.budget is not None:
            self.budget.record(nbytes)
            self.state.upload_budget = self.budget.to_dict()

    def _train_and_upload(self, ann: RoundAnnouncement) -> None:
        try:
            self._round(ann)
        except (EncodeError, ValidationError, ValueError, struct.error, LinkError) as exc:
            # A round that cannot be answered properly is sat out, never a crash loop: the
            # retained announcement would bring the same failure back after a restart.
            log.error("round %d: %s: %s; sitting it out", ann.round_id, type(exc).__name__, exc)
            self._failed(ann)
        except OSError as exc:
            # The outbox cannot be written (a full disk) before the answer goes: nothing was
            # sent, the residual is as it was.
            self._fault("disk", exc, f"round {ann.round_id}: cannot keep the answer, sitting out")
            self._failed(ann)

    def _failed(self, ann: RoundAnnouncement) -> None:
        """Sit out a round that could not be answered properly."""
        self.stats.failed += 1
        self._leave_secure(abort=True)
        self._skip(ann, "other", trained=False, outcome="failed")

    def _round(self, ann: RoundAnnouncement) -> None:
        assert self.global_weights is not None
        cfg = ann.config
        if self.eligibility is not None:
            decision = self.eligibility(self._upload_estimate(cfg))
            if not decision.train:
                self._skip(ann, decision.reason, trained=False)
                return
        if isinstance(self.data, Dataset):
            self._round_data = self.data
        else:
            try:
                self._round_data = self.data()
            except TaskError as exc:
                log.info("round %d: no training data yet (%s)", ann.round_id, exc)
                self._skip(ann, "not_ready", trained=False)
                return
            except (RuntimeError, OSError) as exc:
                # The sample store cannot be read (StoreError is a RuntimeError: a damaged
                # database, samples of two channel counts after a firmware update): sat out,
                # never a crash loop on the retained announcement.
                self._fault("data", exc, f"round {ann.round_id}: cannot read the training data")
                self._skip(ann, "not_ready", trained=False)
                return
            self._fault_over("data")
        if cfg.secure is not None and self.secure is None:
            # A secure round: keys first (cheap, so the key list closes quickly), training
            # once the key list is in and the shares are out (``_on_secagg``).
            if not self._join_secure(ann):
                self._skip(ann, "other", trained=False, outcome="failed")
            return
        started = time.perf_counter()
        self._training_since = started
        # The newest examples score the global model and sit this round's training out.
        self._round_data, held_out = evaluation.hold_out(
            self._round_data, cfg.eval_fraction, cfg.eval_min_samples
        )
        if self._runtime_holds != self.global_version:
            self.runtime.set_weights(self.global_weights)
        self._runtime_holds = None  # training changes them
        scored = None if held_out is None else evaluation.score(self.runtime, held_out)
        # Overflow on the way is not an error here: a diverged result is (check_trained).
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            result = train_local(
                self.runtime,
                self._round_data,
                epochs=cfg.epochs,
                batch_size=cfg.batch_size,
                lr=cfg.lr,
                rng=self.rng,
                mu=cfg.mu,
                on_step=self._training_step,
            )
            local = self.runtime.get_weights()
            delta = steps.local_delta(local, self.global_weights)
        steps.check_trained(result.loss, delta)
        train_loss: float | None = result.loss
        self.last_train_loss = result.loss
        if self.on_trained is not None:
            self.on_trained(ann.round_id, local)
        update = steps.with_residual(delta, self.residual)
        within_clip = None
        if cfg.privacy is not None:
            clipped = steps.clip(update, cfg.privacy)
            update = steps.local_noise(clipped.update, cfg.privacy, self.noise_rng)
            if cfg.privacy.noise_multiplier > 0:
                # Local DP: what leaves the device is the noised update; its loss, its score
                # of the global model and its clip bit would not be, so they stay here.
                train_loss = self.last_train_loss = None
                scored = None
            else:
                within_clip = clipped.within  # central DP: the aggregator noises the count
        gate = steps.gate(
            cfg,
            delta,
            self.global_weights,
            consecutive_skips=self.state.consecutive_skips,
            last_global_update=self.last_global_update,
            # A secure round's stages say whether it is still open; its deadline is the
            # aggregator's to judge (the masked input goes once the shares are in).
            late=self.secure is None and self.clock() > ann.deadline,
        )
        self.last_gate = gate
        payload = b""
        parts: list[bytes] = []
        encoding = None
        update_id = secrets.token_hex(8)
        if gate.upload and self.secure is not None:
            if self._prepare_secure(ann, update, result, train_loss, scored, within_clip):
                return  # masked and sent when the neighbours' shares are in
            gate = replace(gate, upload=False, reason="budget")
        elif gate.upload:
            if cfg.he:  # homomorphic encryption: the whole update, encrypted; no residual
                assert self.he_keys is not None  # _on_round sits the round out without it
                codec, tensors = HE_CODEC, steps.encrypt(update, self.he_keys, result.samples, cfg)
            else:
                encoding = steps.encode(update, cfg, self.rng)
                codec, tensors = str(encoding.spec), encoding.encoded.tensors
            header = UpdateHeader(
                device_id=self.device_id,
                round_id=ann.round_id,
                update_id=update_id,
                base_version=ann.model_version,
                num_samples=result.samples,
                codec=codec,
                train_loss=train_loss,
                evaluation=scored,
                within_clip=within_clip,
            )
            payload = encode(header, tensors)
            parts = self._parts(payload, update_id)
            if self.eligibility is not None:
                decision = self.eligibility(self._wire_size(parts))
                if not decision.upload:  # e.g. the daily budget is spent: keep it all for later
                    gate = replace(gate, upload=False, reason=decision.reason)
        if not gate.upload:
            self._leave_secure(abort=True)  # held back: a dropout of the secure round
            self._skip(ann, gate.reason, trained=True, held=update, scored=scored)
            return
        self.last_update_bytes = self._wire_size(parts)
        topic = self.topics.update(self.device_id)
        kept = None if encoding is None else steps.remaining(update, encoding)  # None: HE
        self._sent(self.last_update_bytes)  # before the outbox: its state counts them
        # Outbox first: a crash from here until it is cleared sends these same parts again
        # at the next start (the aggregator applies an update id once) and keeps ``kept``;
        # never the old residual, which still holds what is being sent.
        if self.outbox is not None:
            after = self._answered(ann.round_id, "update")
            self._keep(Pending(ann.round_id, update_id, topic, parts, kept, state=after))
        for part in parts:
            self.link.publish(topic, part, qos=1)
        self._commit(ann.round_id, kept, kind="update")
        self.stats.rounds_trained += 1
        self.outcome = ("sent", None)
        self._status("idle")
        log.info(
            "round %d: trained %d steps on %d samples in %.2fs, loss %.4f; sent %d bytes (%s, %s)",
            ann.round_id,
            result.steps,
            result.samples,
            time.perf_counter() - started,
            result.loss,
            len(payload),
            header.codec,
            gate.reason,
        )

    # -- secure aggregation (agent/secure.py, docs/secure-aggregation.md) -----------------
    def _join_secure(self, ann: RoundAnnouncement) -> bool:
        """Take part in a secure round: derive it, listen for the aggregator's messages and
        advertise this device's keys. False when the announcement makes no valid round."""
        assert ann.config.secure is not None and self.global_weights is not None
        from fedge.protocol.secagg import SecAggError

        from .secure import SecureTurn

        try:
            plan = steps.secure_plan(
                ann.config,
                ann.config.secure,
                fleet=self.topics.fleet,
                round_id=ann.round_id,
                devices=ann.selected,
                shapes={k: tuple(v.shape) for k, v in self.global_weights.items()},
            )
            turn = SecureTurn(plan, self.device_id, ann)
        except SecAggError as exc:
            log.error("round %d: secure aggregation: %s", ann.round_id, exc)
            return False
        if not self._secagg_subscribed:
            # Before the keys go out: the broker sends what follows on this connection.
            self.link.subscribe(self.topics.secagg(self.device_id), qos=1)
            self.link.subscribe(self.topics.secagg_all, qos=1)
            self._secagg_subscribed = True
        self.secure = turn
        topic = self.topics.update(self.device_id)
        payload = turn.advertise()
        self.link.publish(topic, payload, qos=1)
        self._sent(publish_size(topic, len(payload), 1))
        return True

    def _prepare_secure(
        self,
        ann: RoundAnnouncement,
        update: dict[str, np.ndarray],
        result: Any,
        train_loss: float | None,
        scored: Evaluation | None,
        within_clip: bool | None,
    ) -> bool:
        """Seal the update and keep it for the masking; False if the byte budget says no."""
        assert self.secure is not None
        from .secure import Prepared

        sealed = steps.seal(update, self.secure.plan, self.rng)
        p = self.secure.plan.params
        if self.eligibility is not None:
            estimate = (p.length * p.k + 7) // 8 + 1024
            if not self.eligibility(estimate).upload:
                return False
        self.secure.prepare(
            Prepared(
                update_id=secrets.token_hex(8),
                base_version=ann.model_version,
                sealed=sealed,
                kept=steps.remaining(update, sealed),
                num_samples=result.samples,
                train_loss=train_loss,
                evaluation=scored,
                within_clip=within_clip,
                log_line=(result.steps, result.samples, result.loss),
            )
        )
        self.stats.rounds_trained += 1
        log.info(
            "round %d: trained %d steps on %d samples, loss %.4f; waiting for the shares",
            ann.round_id,
            result.steps,
            result.samples,
            result.loss,
        )
        return True

    def _on_secagg(self, topic: str, payload: bytes) -> None:
        turn = self.secure
        if turn is None:
            self._refuse("secagg_wrong_round", topic, "no secure round open on this device")
            return
        from fedge.protocol.secagg import SecAggError

        from .secure import Action

        try:
            answer = turn.answer(payload)
        except SecAggError as exc:
            self._leave_secure(abort=True)
            self._refuse(f"secagg_{exc.reason}", topic, f"round {turn.round_id}: {exc}")
            return
        if answer.repeated:  # a redelivery (its PUBACK was lost): answered already
            self.stats.rejected["secagg_duplicate"] += 1
            count = self.stats.rejected["secagg_duplicate"]
            if count == 1 or count % 100 == 0:
                log.info(
                    "round %d: a secure-aggregation message again, ignored (%d so far)",
                    turn.round_id,
                    count,
                )
            return
        out = self.topics.update(self.device_id)
        if answer.action is Action.PUBLISH:
            self.link.publish(out, answer.payload, qos=1)
            self._sent(publish_size(out, len(answer.payload), 1))
        elif answer.action is Action.MASKED:
            try:
                self._send_masked(turn, answer.payload)
            except OSError as exc:  # the outbox: nothing was sent
                self._fault("disk", exc, f"round {turn.round_id}: cannot keep the masked update")
                self._failed(turn.announcement)
                return
        if answer.done:
            self._leave_secure(abort=False)
        elif answer.trains:  # the shares are out: train, and keep the update for the mask
            self._train_and_upload(turn.announcement)

    def _leave_secure(self, *, abort: bool) -> None:
        """The device's part in its secure round is over: done, or given up (``abort``). A
        quiet device also stops listening on the secagg topics until its next secure round
        (which subscribes before its keys go out): the key lists and survivor lists of
        rounds it is not in would wake its radio."""
        if self.secure is not None and abort:
            self.secure.abort()
        self.secure = None
        if self.quiet and self._secagg_subscribed:
            self.link.unsubscribe(self.topics.secagg(self.device_id))
            self.link.unsubscribe(self.topics.secagg_all)
            self._secagg_subscribed = False

    def _send_masked(self, turn: SecureTurn, masked: bytes) -> None:
        """The masked input in the usual update envelope: chunked, kept in the outbox,
        committed with its residual, as any update."""
        prep = turn.prepared
        assert prep is not None
        header = UpdateHeader(
            device_id=self.device_id,
            round_id=turn.round_id,
            update_id=prep.update_id,
            base_version=prep.base_version,
            num_samples=prep.num_samples,
            codec="secagg",
            train_loss=prep.train_loss,
            evaluation=prep.evaluation,
            within_clip=prep.within_clip,
        )
        payload = encode(header, {"masked": np.frombuffer(masked, np.uint8)})
        parts = self._parts(payload, prep.update_id)
        topic = self.topics.update(self.device_id)
        self.last_update_bytes = self._wire_size(parts)
        self._sent(self.last_update_bytes)
        if self.outbox is not None:
            after = self._answered(turn.round_id, "update")
            self._keep(Pending(turn.round_id, prep.update_id, topic, parts, prep.kept, state=after))
        for part in parts:
            self.link.publish(topic, part, qos=1)
        self._commit(turn.round_id, prep.kept, kind="update")
        self.outcome = ("sent", None)
        self._status("idle")
        log.info("round %d: sent the masked update, %d bytes", turn.round_id, len(payload))

    def _commit(
        self,
        round_id: int,
        kept: dict[str, np.ndarray] | None,
        *,
        kind: str,
        durable: bool = False,
    ) -> None:
        """Residual, then state: the outbox written before the publish covers the gap. The
        outbox also holds ``kept`` and the state as the answer leaves it (``_answered``) until
        the next one replaces it, so neither file is written while there is an outbox: the
        state is saved when the device is next idle (``step``) or stops, off the round's path
        (``durable``: both are written now, the outbox is about to go)."""
        durable = durable or self.outbox is None
        self._hold(kept, durable=durable)
        after = self._answered(round_id, kind)
        self.state.last_round = after.last_round
        self.state.consecutive_skips = after.consecutive_skips
        if durable:
            self._save(self.state)
        else:  # saved with the answer, in the outbox
            self._saves += 1
            self._unsaved = True

    def _answered(self, round_id: int, kind: str) -> AgentState:
        """The state once the answer to ``round_id`` (an update or a held-back skip) is
        committed: what the outbox keeps with it."""
        return replace(
            self.state,
            last_round=max(self.state.last_round, round_id),
            consecutive_skips=self.state.consecutive_skips + 1 if kind == "skip" else 0,
        )

    def resend_interrupted(self) -> bool:
        """Send the outbox again after a restart (see ``fedge.agent.outbox``)."""
        pending = None if self.outbox is None else self.outbox.take()
        if pending is None:
            return False
        assert self.outbox is not None
        if self._untrusted(pending):
            self._drop(pending)
            return False
        committed = self.state.last_round >= pending.round_id
        log.warning(
            "sending the %s %s for round %d again after a restart%s",
            pending.kind,
            pending.update_id,
            pending.round_id,
            "" if committed else "; it was not saved as sent",
        )
        for part in pending.parts:
            self.link.publish(pending.topic, part, qos=1)
        try:
            if not committed:
                self._commit(pending.round_id, pending.kept, kind=pending.kind, durable=True)
            else:
                # Neither file is written while an outbox holds the residual and the state:
                # the files are older. The outbox's residual is the residual since (every
                # change goes through it); its state came in at start (``load_state``), and
                # goes to the file before the outbox goes.
                self._hold(pending.kept, durable=True)
                self._save(self.state)
        except OSError as exc:
            self._fault("disk", exc, "cannot save the residual (the outbox keeps it)")
            return True
        if self._unsaved:  # the state file refused it (``_save``): the outbox keeps it
            return True
        # Offline the publishes are only in the link's memory: a restart before the broker
        # has them would lose the answer, the state saying it was sent. So the outbox goes
        # once the broker has acknowledged them (now, when idle, or at stop); until then a
        # restart sends it again, with the same update id (the aggregator applies it once).
        self._resent = True
        self._forget_resent()
        return True

    def _keep(self, pending: Pending) -> None:
        """Write the outbox before the answer goes (it replaces the answer sent before)."""
        assert self.outbox is not None
        self.outbox.put(pending)
        self._resent = False

    def _forget_resent(self) -> None:
        """Remove the outbox once the broker has acknowledged the answer sent again at start
        (and whatever was published since), without waiting for it."""
        if not self._resent or self.outbox is None or not self.link.flush(0):
            return
        self._resent = False
        try:
            self.outbox.clear()
        except OSError as exc:  # sent once more at the next start: the aggregator ignores it
            self._fault("disk", exc, "cannot remove the outbox")

    def _hold(self, kept: dict[str, np.ndarray] | None, *, durable: bool = True) -> None:
        """Keep ``kept`` as the residual. Not ``durable``: in memory only, the outbox holds it
        on disk (every residual comes through it) until a restart writes it back."""
        self.residual = kept
        if self._residual_store is not None and durable:
            self._residual_store.save(kept)

    def _upload_estimate(self, cfg: TrainingConfig) -> int:
        """Bytes the next update will likely cost, before training."""
        if self.last_update_bytes:
            return self.last_update_bytes
        weights = self.global_weights or {}
        if cfg.he:  # homomorphic encryption: a ciphertext is full whatever it holds
            return he_model.estimate(weights)
        size = sum(int(w.size) for w in weights.values())
        spec = parse_codec(cfg.codec)
        if spec.fraction is None:
            return sum(int(w.nbytes) for w in weights.values())
        # top-k: a value and about one index byte per kept entry, plus the header
        kept = max(spec.topk_count(size), min(cfg.topk_min_entries, size))
        return kept * (2 if spec.quantizer == "int8" else 5) + 1024

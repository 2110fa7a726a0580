"""The round coordinator: announce, collect, validate, average, publish, log.

One thread owns all state; the link's network thread only enqueues messages.
Each round moves through::

    waiting --(enough devices online)--> collecting --(all answered, or deadline
    with quorum)--> averaged: new global published (retained), line in rounds.jsonl
                 \\--(deadline without quorum)--> failed: a new round is announced

Validation rejects an update with a reason that is logged once and counted:
``wrong_round``, ``not_selected``, ``duplicate``, ``already_answered``,
``stale_base``, ``shape_mismatch``, ``not_finite``, ``topic_mismatch``,
``bad_evaluation`` and the envelope decoder's own reasons.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fedge.protocol import (
    DEFAULT_LIMITS,
    ChunkError,
    CodecError,
    DecodeError,
    Evaluation,
    GlobalModelHeader,
    InvalidId,
    Link,
    Message,
    PrivacySettings,
    Reassembler,
    RoundAnnouncement,
    SecureSettings,
    SkipNotice,
    Status,
    Topics,
    TrainingConfig,
    UpdateHeader,
    encode,
    is_chunk,
    parse_codec,
    sign,
)
from fedge.protocol.downlink import Shadow, checksum
from fedge.protocol.he import HeKeys
from fedge.protocol.messages import HE_CODEC
from fedge.protocol.secagg import SecAggAbort, SecAggError, address, is_secagg, secure_round
from fedge.protocol.status import decode_status
from fedge.protocol.wire import PUBACK_SIZE, publish_size

from . import fed_eval, he_round, intake, privacy
from .accounting import Ledger
from .accumulate import Accumulator, RunningSum, make_accumulator
from .config import AggregatorConfig
from .inbox import Inboxes
from .sample_limits import bound_samples
from .secure import SecureSum
from .shard import ShardedSum, Shards
from .store import BACKUP_MARK, Store, StoreError, read_back
from .strategies.factory import make_strategy

log = logging.getLogger("fedge.aggregator")

Weights = dict[str, np.ndarray]
KEEP_MODELS = 3  # global models (and strategy states) kept in the state database
PROBATION_AFTER = 2  # rounds in a row a device must miss before rounds stop waiting for it
HISTORY = 10  # a device's last selections whose outcome (answered in time or not) is kept
REVISIT_AFTER = 5  # rounds left out after which a device ranks as untried again
FLUSH_TIMEOUT = 10.0  # seconds the aggregator waits, once done, for its last publishes to go
Evaluator = Callable[[Weights], tuple[float, float]]


@dataclass
class OpenRound:
    round_id: int
    selected: list[str]
    started: float
    deadline: float
    # The accepted updates, folded into a running sum (or kept, for a robust combiner; or
    # held by the shard workers, which send their partial sums when the round closes).
    acc: Accumulator | ShardedSum | SecureSum | he_round.HeAccumulator
    counts: dict[str, int] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, SkipNotice] = field(default_factory=dict)
    # The devices' scores of the round's model on their held-out data (not kept for a
    # resumed round: after a restart the score covers the answers that came after it).
    evals: dict[str, Evaluation] = field(default_factory=dict)
    wire_up: Counter[str] = field(default_factory=Counter)  # MQTT bytes per device
    wire_down: int = 0  # MQTT bytes each selected device had to receive for this round
    # ...except quiet devices (aggregator/inbox.py): what their inbox got, by device.
    wire_down_by_device: dict[str, int] = field(default_factory=dict)
    # Online devices not selected that hear the round: not quiet, or quiet but still
    # listening to every round (their inbox has brought nothing yet).
    listening: int = 0
    sleeping: int = 0  # online quiet devices not selected: nothing reached them
    resting: list[str] = field(default_factory=list)  # quiet ones that declared a rest
    asleep: set[str] = field(default_factory=set)  # the sleeping (not kept over a restart)
    # Quiet devices still listening, not selected, sent the round in their inbox as well.
    probed: set[str] = field(default_factory=set)
    # Differential privacy: the clip announced, the rate devices were sampled at (selected
    # / online), and each uploader's bit "my norm was within the clip" (adaptive clip).
    clip: float | None = None
    sampling_rate: float = 1.0
    within_clip: dict[str, bool] = field(default_factory=dict)
    # Secure aggregation: the round's settings as announced (a fresh seed each round).
    secure: SecureSettings | None = None
    # A resumed round: what its inboxes got before the restart (wire_down_by_device starts
    # again after it), whether listening/sleeping/resting are known (else counted at the
    # close), and the record's figures that leave out some of what came before the restart.
    inbox_before: dict[str, int] = field(default_factory=dict)
    idle_known: bool = True
    partial: list[str] = field(default_factory=list)

    @property
    def uploaded(self) -> set[str]:
        """Devices whose update is in the round."""
        return self.acc.uploaded

    @property
    def answered(self) -> set[str]:
        return self.acc.uploaded | set(self.skipped)

    @property
    def bytes_received(self) -> int:
        return sum(self.wire_up.values())


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
        signing_key: Ed25519PrivateKey | None = None,
        sample_caps: dict[str, int] | None = None,
        revoked: set[str] | None = None,
        floor: tuple[int, int] | None = None,
        noise_rng: np.random.Generator | None = None,
        he_keys: HeKeys | None = None,
    ) -> None:
        self.cfg = config
        # Signs every round announcement and global model; None: they go out unsigned.
        self.signing_key = signing_key
        # Per-device caps on declared sample counts (config and provisioning registry).
        self.sample_caps = dict(sample_caps or {})
        self.samples_clipped = 0  # declared counts clipped so far
        self.republished = 0  # times the global model was sent again
        # Revoked devices: their retained "online" status outlives their access (the ACL no
        # longer lets their Last Will through), so they are never counted online or selected.
        self.revoked = frozenset(revoked or ())
        self.topics = Topics(config.fleet)
        self.link = link
        self.store = store
        self.evaluator = evaluator
        self.on_round = on_round or (lambda summary: None)
        self.clock = clock
        self.online: set[str] = set()
        self.known: set[str] = set()  # every device whose status was heard, online or not
        # Each device's last HISTORY selections, (round id, answered in time), oldest first:
        # kept in the store, so a restarted aggregator still knows who does not answer.
        self.history = store.outcomes()
        # The rounds that closed without some of their selected devices, until their deadline:
        # {round id: (deadline, those devices)}; from the store, so that a restart keeps them
        # (the outcomes say who was missing). See _late_spare.
        self._spares = store.spares(clock(), HISTORY)
        self.schedule = config.schedule.build()
        self._last_start = store.last_round_start()  # the interval counts across restarts
        self._told_start: float | None = None  # the scheduled start already logged
        self.rejected: Counter[str] = Counter()
        self.on_note: Callable[[str], None] | None = None  # while no round can start
        self.current: OpenRound | None = None
        self.done = False
        self.strategy = make_strategy(config.strategy)
        # With [shards], workers take the updates and this process merges their sums.
        self.shards = (
            None
            if config.shards is None
            else Shards(config.shards, self.topics, link, initial_weights)
        )
        # Room for every device of a round to be mid-upload at once (default 16 is too few).
        self.reassembler = Reassembler(
            max_messages=max(64, 2 * config.min_devices, 2 * config.devices_per_round),
            max_bytes=DEFAULT_LIMITS.max_payload * 4,
            timeout=config.chunk_timeout,
            clock=clock,
        )
        self._global_wire_size = 0
        # Compact globals ([downlink]): the devices' copy of the model, moved by deltas
        # between full syncs (set by _publish_global).
        self.shadow: Shadow | None = None
        self.deltas_sent = 0  # model versions sent as a delta
        self._last_full = -1  # the version last sent whole
        # Quiet devices: their rounds and models go to their inboxes (aggregator/inbox.py).
        self.inboxes = Inboxes(self.topics, link)
        self._chunk_wire: dict[tuple[str, bytes], int] = {}  # bytes of incomplete messages
        self.stray_bytes = 0  # update bytes that no open round could be credited with
        self._last_republish = -float("inf")  # when the global was last sent again
        self._republished_version = -1  # and which version that was
        self._whole_sent: dict[str, tuple[float, int]] = {}  # quiet device -> (when, version)
        self._last_wait_log = clock()  # statuses come in just after start: give them time
        resumed = store.latest_model()
        if resumed is None:
            # ``floor`` is the last (round, model version) recorded (after --reset-state):
            # numbering goes on above it, or agents would refuse the rounds as replays; one
            # round and version further, as for a restored backup (_catch_up).
            last_round, last_version = floor or (0, -1)
            if floor is not None:
                last_round, last_version = last_round + 1, last_version + 1
                self._pass_over(last_round, last_version + 1)
            self.version = last_version + 1
            self.weights = {k: np.asarray(v, np.float32) for k, v in initial_weights.items()}
            with store.transaction():
                store.save_model(self.version, 0, self.weights)
                if last_round:
                    store.set_meta("round_floor", str(last_round))
        else:
            self.version, _, self.weights = resumed
            ours = {k: tuple(v.shape) for k, v in self.weights.items()}
            theirs = {k: tuple(np.shape(v)) for k, v in initial_weights.items()}
            if ours != theirs:
                raise StoreError(
                    f"the global model in {store.path} (v{self.version}) does not fit the"
                    f" configured model ({_shape_difference(ours, theirs)}): to train the new"
                    " model, start afresh with `fedge aggregator --config CONFIG --reset-state`"
                )
            self.strategy.load_state(store.strategy_state(self.version))
        # Homomorphic encryption (aggregator/he_round.py): the model only as ciphertexts;
        # ``weights`` is then a template of zeros (shapes), and nothing can evaluate it.
        self.he = he_round.start(
            he_keys, store, self.version, self.weights, config.strategy.server_lr
        )
        if self.he is not None:
            self.weights, self.evaluator = self.he.template, None
        t = config.training
        size = sum(int(np.size(w)) for w in self.weights.values())
        self._expected_codec = intake.expected_codec(t.codec, t.topk_min_entries, size)
        if self.he is not None:  # homomorphic encryption
            self._expected_codec = HE_CODEC
        # Differential privacy (aggregator/privacy.py): the noise draws from the OS's entropy,
        # never from the config's seed, which would let anyone who reads it remove the noise.
        self.noise_rng = noise_rng or np.random.default_rng()
        self.privacy = config.privacy
        self.budget_stop: str | None = None  # why training stopped at the epsilon budget
        if self.privacy is not None:
            p = self.privacy
            try:
                self.ledger = Ledger.load(
                    store.meta("privacy_ledger"),
                    p.mode,
                    p.noise_multiplier,
                    p.target_delta,
                    p.accountant,
                )
            except ValueError as exc:
                raise StoreError(f"{store.path}: {exc}") from exc
            self.clip = float(store.meta("privacy_clip") or p.clip)
            self.value_noise = p.value_noise_multiplier(config.expected_devices)
            self.count_noise = p.count_noise(config.expected_devices)
            log.info(
                "differential privacy: %s, noise multiplier %g, clip %g%s; epsilon so far %.3f"
                " at delta %g over %d round(s)%s",
                p.mode,
                p.noise_multiplier,
                self.clip,
                "" if p.target_quantile is None else f" (adaptive, quantile {p.target_quantile:g})",
                self.ledger.epsilon(),
                p.target_delta,
                self.ledger.rounds,
                "" if p.epsilon_budget is None else f", budget {p.epsilon_budget:g}",
            )
        if resumed is not None:
            self._catch_up(floor)
        self.completed = store.completed_rounds()
        self.next_round_id = store.last_round_id() + 1
        # Selection draws go on where they were, not from the seed again after a restart.
        self.rng = rng or np.random.default_rng([config.seed, self.next_round_id])
        self._resume_open_round()
        self._resume_chunks()
        self._check_done()

    def _catch_up(self, floor: tuple[int, int] | None) -> None:
        """A restored backup (it carries ``BACKUP_MARK``), or a state behind what ``floor``
        and the rounds.jsonl records after its last round show: the fleet may have seen
        rounds and models it does not know. Agents refuse round ids they have answered and
        models older than theirs, so every round would fail and the fleet stall for good.
        Numbering goes on above what is recorded (as after --reset-state), one round and
        one model version further: the round after the newest recorded may have been open
        when the state was lost (rounds run back to back; a backup is taken between two),
        or have closed and sent its model before its record was written. The state's model
        goes out under the version after those, which the devices take; the rounds after
        the backup are lost to the model. Their epsilon is not: it goes into the ledger,
        the round passed over on the safe side."""
        mark = self.store.meta(BACKUP_MARK)
        last_round = self.store.last_round_id()
        missed: dict[int, dict] = {}  # records of rounds the state does not know, by id
        newest = 0  # the newest round rounds.jsonl records
        for record in read_back(self.cfg.log_path):
            try:
                round_id, version = int(record["round"]), int(record["model_version"])
            except (KeyError, TypeError, ValueError):
                continue
            newest = max(newest, round_id)
            if round_id <= last_round:
                break
            missed.setdefault(round_id, record)  # (one written twice: its newest copy)
            seen = (round_id, version) if floor is None else floor
            floor = (max(round_id, seen[0]), max(version, seen[1]))
        seen_round, seen_version = last_round, self.version
        if floor is not None:
            seen_round, seen_version = max(floor[0], last_round), max(floor[1], self.version)
        if mark is None and (seen_round, seen_version) == (last_round, self.version):
            return  # the live state, as new as its history
        lost, version = seen_round + 1, seen_version + 2  # passed over: lost, version - 1
        spent = 0.0  # epsilon before the missed rounds (under DP)
        # In rounds.jsonl before the state moves on: a crash in between passes over one
        # round more at the next start (and counts it), never one less.
        self._abandon_open_rounds("open in the restored state", recorded=newest)
        self._pass_over(lost, version)
        with self.store.transaction():
            self.store.save_model(version, 0, self.weights)
            self.store.save_strategy_state(version, self.strategy.state())
            if self.he is not None:
                self.he.save(self.store, version)
            self.store.set_meta("round_floor", str(lost))
            if self.privacy is not None:
                spent = self.ledger.epsilon()
                unknown = sum(r not in missed for r in range(last_round + 1, lost + 1))
                self._account_missed(list(missed.values()), unknown)
                self.store.set_meta("privacy_ledger", self.ledger.to_json())
            self.store.forget_meta(BACKUP_MARK)  # caught up: a restart is not a restore
        log.warning(
            "%s (round %d, model v%d); the fleet may have seen round %d and model v%d, and"
            " round %d may have been open when the state was lost: passed over. Rounds go on"
            " at %d, the model goes out as v%d%s",
            "a restored backup" if mark is not None else "the state is behind rounds.jsonl",
            last_round,
            self.version,
            seen_round,
            seen_version,
            lost,
            lost + 1,
            version,
            ""
            if self.privacy is None
            else f"; epsilon {spent:.3f} -> {self.ledger.epsilon():.3f} with the"
            f" {lost - last_round} round(s) the state missed",
        )
        self.version = version

    def _pass_over(self, round_id: int, version: int) -> None:
        """The record of a round id passed over at start (it may have been open when the
        state was lost), with ``version``, the model the state goes out as: a later start on
        an older state numbers past both. Who was selected is not known: under DP, a later
        catch-up counts it for every device at rate 1."""
        record: dict = {
            "round": round_id,
            "fleet": self.topics.fleet,
            "status": "abandoned",
            "why": "may have been open when the state was lost: passed over",
            "model_version": version,
        }
        p = self.cfg.privacy
        if p is not None:
            record["privacy"] = {
                "mode": p.mode,
                "noise_multiplier": p.noise_multiplier,
                "sampling_rate": 1.0,
            }
        _append_jsonl(self.cfg.log_path, record)

    def _account_missed(self, missed: list[dict], unknown: int) -> None:
        """Put the rounds a restored state missed into the privacy ledger: those in
        rounds.jsonl (done, failed, abandoned) as recorded, the others (``unknown``: ids
        with no record, e.g. the round passed over) on the safe side: central DP without
        amplification, local DP as if every device was selected."""
        assert self.privacy is not None
        events: list[tuple[float, float]] = []
        selections: list[list[str] | None] = []
        for record in missed:
            dp = record.get("privacy")
            if not isinstance(dp, dict):
                continue  # a round without [privacy]
            try:
                q = float(dp.get("sampling_rate", 1.0))
                z = float(dp.get("noise_multiplier", self.ledger.z))
            except (TypeError, ValueError):
                q, z = 1.0, self.ledger.z
            # (The record rounds the rate to 6 digits: up, on the safe side.)
            q = min(1.0, q + 5e-7) if 0 < q <= 1 else 1.0
            events.append((q, z if z > 0 else self.ledger.z))
            if "missing" not in record:  # a round passed over: who was selected is not known
                selections.append(None)
                continue
            names = [*record.get("participants", []), *record.get("skipped", [])]
            selections.append([str(d) for d in [*names, *record.get("missing", [])]])
        for _ in range(unknown):
            events.append((1.0, self.ledger.z))
            selections.append(None)
        self.ledger.add_rounds(events, selections)

    def _abandon_open_rounds(self, why: str, *, keep: int | None = None, recorded: int = 0) -> None:
        """Mark the open rounds (but ``keep``) abandoned, each with a record in rounds.jsonl
        first (unless rounds.jsonl records rounds up to ``recorded``): who was selected and
        who had answered, and under DP the rate they were sampled at. A restored backup that
        missed the round then numbers past it and counts its epsilon as it was. (A crash
        before the state marks it writes the record again: counted once.)"""
        rounds = self.store.open_rounds()
        rate = self.store.meta("privacy_open_rate")  # the newest round's
        for round_id, version, _started, _deadline, selected in rounds:
            if round_id == keep or round_id <= recorded:
                continue
            kinds = self.store.answer_kinds(round_id)
            summary: dict = {
                "round": round_id,
                "fleet": self.topics.fleet,
                "status": "abandoned",
                "why": why,
                "model_version": version,
                "selected": len(selected),
                "participants": sorted(d for d, k in kinds.items() if k == "update"),
                "skipped": sorted(d for d, k in kinds.items() if k == "skip"),
                "missing": sorted(set(selected) - set(kinds)),
            }
            if self.privacy is not None:
                newest = round_id == rounds[-1][0]
                q = float(rate) if newest and rate is not None else 1.0  # else: the safe side
                summary["privacy"] = {
                    "mode": self.privacy.mode,
                    "noise_multiplier": self.privacy.noise_multiplier,
                    "sampling_rate": round(q, 6),
                }
            _append_jsonl(self.cfg.log_path, summary)
            log.warning("round %d abandoned: %s", round_id, why)
        self.store.abandon_open_rounds(except_round=keep)

    def _resume_chunks(self) -> None:
        """Feed the chunks of messages that were not whole at the crash in again."""
        kept = self.store.chunks()
        for device, payload in kept:
            self._on_update_payload(Message(self.topics.update(device), payload))
        if kept:
            log.info("took up %d chunk(s) of update(s) that were not whole yet", len(kept))

    def _resume_open_round(self) -> None:
        """Take up the round that was open when the process stopped, with what it accepted.

        Older open rounds, and one on another model version (cannot happen: a round's model
        and its record commit together), are marked abandoned, each with its record.
        """
        rounds = self.store.open_rounds()
        if not rounds:
            return
        round_id, version, started, deadline, selected = rounds[-1]
        if version != self.version:
            self._abandon_open_rounds(f"it was for model v{version}, have v{self.version}")
            return
        if self.cfg.secure is not None:
            # The protocol's state (keys, the masked sum) lives in memory only, and the
            # devices' secrets in theirs: the round starts afresh.
            self._abandon_open_rounds("a secure round open when the aggregator stopped")
            return
        if self.shards is not None:
            # Which worker holds which of its updates is not kept: the round starts afresh.
            self._abandon_open_rounds("open when the sharded coordinator stopped")
            return
        self._abandon_open_rounds("a newer round is open", keep=round_id)  # older ones, if any
        now = self.clock()
        rnd = OpenRound(
            round_id,
            selected,
            started,
            max(deadline, now + self.cfg.round_timeout / 2),
            self._accumulator(),
        )
        if self.privacy is not None:
            # The round goes on with the clip it announced and the rate it sampled at.
            rnd.clip = float(self.store.meta("privacy_open_clip") or self.clip)
            rnd.sampling_rate = float(self.store.meta("privacy_open_rate") or 1.0)
        for answer in self.store.answers(round_id):
            if answer.kind == "skip":
                notice = SkipNotice(
                    device_id=answer.device_id,
                    round_id=round_id,
                    update_id=answer.update_id,
                    reason="resumed",
                    trained=answer.trained,
                    num_samples=answer.num_samples,
                )
                self._take_skip(rnd, notice)
            elif answer.delta is not None and not isinstance(rnd.acc, SecureSum):
                rnd.acc.add(answer.device_id, answer.delta, self._weight(answer.num_samples))
                rnd.counts[answer.device_id] = answer.num_samples
                if answer.train_loss is not None:
                    rnd.losses[answer.device_id] = answer.train_loss
            # (A state from before the wire bytes were kept: the payload, short of them.)
            wire = answer.nbytes if answer.wire is None else answer.wire
            rnd.wire_up[answer.device_id] = max(rnd.wire_up[answer.device_id], wire)
        # Not kept, and so left out (the record says which figures): what messages refused
        # before the restart took, unless their device's answer was kept (garbage must not
        # grow the state); the global and whole models sent again on request before it.
        rnd.partial = [
            "bytes_received",
            "bytes_up_by_device",
            "bytes_down_per_device",
            "bytes_down_by_device",
        ]
        kept = json.loads(self.store.meta("open_round") or "{}")
        if kept.get("round") == round_id:
            rnd.listening, rnd.sleeping = int(kept["listening"]), int(kept["sleeping"])
            rnd.resting = [str(d) for d in kept["resting"]]
            rnd.wire_down = int(kept["bytes_down"])  # the restart sends the round again
            rnd.inbox_before = {str(d): int(n) for d, n in kept["inboxes"].items()}
        else:  # opened by a version that did not keep them: counted at the close
            rnd.idle_known = False
            rnd.partial += ["listening", "sleeping", "resting"]
        self.current = rnd
        log.warning(
            "resumed round %d at model v%d with %d of %d answer(s) kept; deadline in %.0f s",
            round_id,
            self.version,
            len(rnd.answered),
            len(selected),
            rnd.deadline - now,
        )

    # -- lifecycle -----------------------------------------------------------------
    def start(self, timeout: float = 30.0, *, keep_trying: bool = False) -> None:
        if keep_trying:
            self.link.connect(timeout=timeout, keep_trying=True)
        else:
            self.link.connect(timeout=timeout)
        if self.shards is None:
            self.link.subscribe(self.topics.updates, qos=1)
        else:
            self.shards.subscribe()
        self.link.subscribe(self.topics.statuses, qos=1)
        if self.cfg.downlink is not None and self.version == 0:
            # Compact globals from a fresh start: every device has v0 in its model file, and
            # the round announcement names its checksum; the whole model goes out only to a
            # device that asks for it (one with another model file).
            self.shadow, self._last_full = Shadow(self.weights, 0), 0
        else:
            self._publish_global(round_id=0)
        if self.current is not None:  # a resumed round: its retained announcement may be lost
            self._publish_announcement(self.current)
        if self.signing_key is None:
            log.warning(
                "no signing_key: rounds and global models go out unsigned; agents that pin"
                " the aggregator's key will refuse them"
            )
        log.info(
            "aggregator for fleet %s online at model v%d, strategy %s",
            self.cfg.fleet,
            self.version,
            self.strategy.describe(),
        )
        if self.cfg.secure is not None and "topk" in self.cfg.training.codec:
            log.warning(
                "[secure] with codec %s: every device sends the round's shared random index"
                " set (random-k), which learns far slower than top-k (bench/README.md); a"
                ' dense codec = "float32" is quantised to the ring at %d bits an entry',
                self.cfg.training.codec,
                self.cfg.secure.bits,
            )
        s = self.cfg.strategy
        if s.robust != "mean" and not s.norm_bound and "topk" in self.cfg.training.codec:
            log.warning(
                "[strategy] robust = %s without norm_bound under top-k uploads: a coordinate"
                " only an attacker sends keeps its value (bench/README.md, Faults); set"
                " norm_bound = 1",
                s.robust,
            )

    def run(self, stop: threading.Event, poll: float = 0.2) -> None:
        while not stop.is_set() and not self.done:
            self.step(poll)
        # The last model may still sit in the link's buffer (a link without a network
        # thread writes while it is driven): out with it before the loop goes quiet.
        if self.done and not self.link.flush(FLUSH_TIMEOUT):
            log.warning("the broker has not acknowledged the last model yet")

    def step(self, timeout: float | None) -> None:
        msg = self.link.get(timeout)
        if msg is not None:
            self.handle(msg)
            self.link.ack(msg)  # kept (or refused) now: the broker may forget it
        self.tick()

    def _check_done(self) -> None:
        self.done = bool(self.cfg.rounds) and self.completed >= self.cfg.rounds

    # -- messages ------------------------------------------------------------------
    def handle(self, msg: Message) -> None:
        if not msg.payload:
            return
        if self.shards is not None and self.shards.owns(msg.topic):
            self.shards.handle(self, msg)
            return
        if not msg.topic.startswith((f"{self.topics.base}/update/", f"{self.topics.base}/status/")):
            # Some brokers (amqtt) hand a new subscription retained messages of other topics.
            self.rejected["unexpected_topic"] += 1
            log.debug("ignored message on %s", msg.topic)
            return
        if msg.topic.startswith(f"{self.topics.base}/update/"):
            try:
                self._on_update_payload(msg)
            except (ValueError, OverflowError, sqlite3.Error) as exc:
                # One device's message must never stop the loop that serves the fleet.
                self._reject("internal", msg.topic, f"{type(exc).__name__}: {exc}")
            return
        try:
            status, legacy = decode_status(msg.payload)
        except DecodeError as exc:
            self._reject(exc.reason, msg.topic, str(exc))
            return
        self._on_status(msg.topic, status, legacy=legacy)

    def _on_update_payload(self, msg: Message) -> None:
        """An update, a chunk of one, or a skip notice, on ``update/{device}``."""
        try:
            device = self.topics.device_of(msg.topic)
        except InvalidId:
            self._reject("topic_mismatch", msg.topic, "not an update topic")
            return
        wire = publish_size(msg.topic, len(msg.payload), 1)
        if not is_chunk(msg.payload):
            self._on_message(msg.topic, device, msg.payload, wire)
            return
        key = (device, bytes(msg.payload[4:12]))  # the chunk header's message id
        full = self._on_chunk(msg.topic, key, msg.payload, wire)
        if full is None:
            return
        wire = self._chunk_wire.pop(key, wire)
        try:
            self._on_message(msg.topic, device, full, wire, chunks=key[1])
        except Exception:
            # Refused all the same ("internal", in handle), or the loop stops: kept, its
            # chunks would come back and fail again at every start.
            self.store.forget_chunks(key[1], device)
            raise
        # Kept or refused: its chunks go only now (an answer kept takes them with it). Gone
        # before, a crash until then would lose the update: the broker sends again only the
        # last chunk, the one not acknowledged.
        self.store.forget_chunks(key[1], device)

    def _on_chunk(
        self, topic: str, key: tuple[str, bytes], chunk: bytes, wire: int
    ) -> bytes | None:
        """Take one chunk of ``key`` (device, message id): the whole message once it is
        complete. A chunk's bytes wait until its message is whole and says which round it
        is for."""
        device, message_id = key
        try:
            full = self.reassembler.add(chunk)
        except ChunkError as exc:
            if not self.reassembler.holds(message_id):
                # Its message is over (refused whole, expired, done) or never began: what it
                # kept and counted goes with it.
                self.stray_bytes += self._chunk_wire.pop(key, 0) + wire
                self.store.forget_chunks(message_id, device)
            elif exc.reason == "duplicate":
                # A QoS 1 redelivery: its bytes came again, for the same message.
                self._chunk_wire[key] = self._chunk_wire.get(key, 0) + wire
            else:
                self.stray_bytes += wire  # a chunk refused; its message goes on without it
            self._reject(f"chunk_{exc.reason}", topic, str(exc))
            return None
        self._chunk_wire[key] = self._chunk_wire.get(key, 0) + wire
        if full is None:
            # Kept before it is acknowledged: after a crash it is fed in again.
            self.store.save_chunk(device, message_id, int.from_bytes(chunk[12:14], "big"), chunk)
        return full

    def _on_message(
        self, topic: str, device: str, payload: bytes, wire: int, *, chunks: bytes | None = None
    ) -> None:
        """A whole message (``chunks``: the id of the stored chunks it came in)."""
        if is_secagg(payload):
            self._on_secagg(topic, device, payload, wire)
            return
        try:
            parsed = intake.parse(payload, device)
        except DecodeError as exc:
            self._reject(exc.reason, topic, str(exc))
            self.stray_bytes += wire
            return
        header, tensors = parsed.header, parsed.tensors
        rnd = self.current
        # A copy of an answer kept: the broker's redelivery of a message whose ack a crash
        # cut off (its bytes are in the answer's already), or a device's resend. Counted
        # apart, as a chunk of it is (_on_chunk): the device's upload counts each answer once.
        seen = self.store.seen_update(device, header.update_id)
        if rnd is not None and header.round_id == rnd.round_id and not seen:
            rnd.wire_up[device] += wire  # this round's bytes, accepted or not
        else:
            self.stray_bytes += wire  # for a closed or unknown round: counted apart
        self._on_update(topic, device, len(payload), header, tensors, seen=seen, chunks=chunks)

    def _reject(self, reason: str, topic: str, detail: str) -> None:
        """Count a rejected message; log the first of each reason, then every 100th."""
        self.rejected[reason] += 1
        count = self.rejected[reason]
        if count == 1 or count % 100 == 0:
            log.warning("rejected message on %s: %s (%s; %d so far)", topic, reason, detail, count)

    def _on_status(self, topic: str, status: Status, *, legacy: bool = False) -> None:
        if topic != self.topics.status(status.device_id):
            self._reject("topic_mismatch", topic, f"status of {status.device_id}")
            return
        if status.device_id in self.revoked:
            self._reject("revoked", topic, f"status of revoked device {status.device_id}")
            self.online.discard(status.device_id)
        elif status.state == "offline":
            self.online.discard(status.device_id)
            self.known.add(status.device_id)
        else:
            self.online.add(status.device_id)
            self.known.add(status.device_id)
            # The birth message (no time: made before the link connected) says nothing of
            # listening; a reconnect alone does not change it.
            listening = None if status.timestamp == 0 else status.listening
            self.inboxes.note_status(
                status.device_id, status.quiet, status.model_version, listening=listening
            )
            # Agents of the envelope status set model_version only when they lacked a model.
            wants = status.wants_model or (legacy and status.model_version is not None)
            sent = 0  # bytes of the whole model sent to a quiet device's inbox
            if wants and status.model_version is not None and status.model_version < self.version:
                if status.quiet:  # to its inbox alone: the others have it
                    sent = self._send_whole(status.device_id)
                else:
                    self._republish_global(f"{status.device_id} has v{status.model_version}")
            if status.quiet:
                self._resend_round(status.device_id, fresh=status.state == "online")
                if listening:
                    self._probe_open(status.device_id)
                # Counted once the round is in its inbox (not before: _resend_round tells by
                # that whether the round reached it).
                rnd = self.current
                if sent and rnd is not None and status.device_id in rnd.wire_down_by_device:
                    rnd.wire_down_by_device[status.device_id] += sent

    def _send_whole(self, device: str) -> int:
        """The whole model to the inbox of a quiet device that asked for it; the MQTT bytes.
        At most once per ``republish_interval`` seconds per device and model version, as
        ``_republish_global`` for the others: a device that asks in every status must not
        turn each into a whole model."""
        now = self.clock()
        when, version = self._whole_sent.get(device, (-math.inf, -1))
        if version == self.version and now - when < self.cfg.republish_interval:
            return 0
        self._whole_sent[device] = (now, self.version)
        return self.inboxes.send_whole(device, self.version, self._inbox_model)

    def _resend_round(self, device: str, *, fresh: bool) -> None:
        """A quiet device selected in the open round that has not answered gets the round
        again: when it was not known as quiet at the announcement (the aggregator had just
        restarted), or when it says it has (re)connected (what its inbox held is gone)."""
        rnd = self.current
        if rnd is None or device not in rnd.selected or device in rnd.answered:
            return
        if rnd.secure is not None or (device in rnd.wire_down_by_device and not fresh):
            return
        payload = self._signed(encode(self._announcement(rnd)), "round")
        rnd.wire_down_by_device[device] = rnd.wire_down_by_device.get(
            device, 0
        ) + self.inboxes.deliver(device, payload, self.version, self._inbox_model)

    def _probe_open(self, device: str) -> None:
        """A quiet device that still listens to every round gets the open round in its
        inbox at once, if the round does not select it (then ``_resend_round`` sees to it):
        the first message there ends its listening, a round after its start at most. The
        round's record counts it as listening: it hears the round."""
        rnd = self.current
        if rnd is None or device in rnd.selected or device in rnd.probed:
            return
        rnd.probed.add(device)
        self.inboxes.probe(device, self._signed(encode(self._announcement(rnd)), "round"))
        if device in rnd.asleep:  # counted asleep at the announcement (it has restarted since)
            rnd.asleep.discard(device)
            rnd.sleeping -= 1
            rnd.listening += 1
            self._keep_open_round(rnd)

    def _on_update(
        self,
        topic: str,
        device: str,
        nbytes: int,
        header: UpdateHeader | SkipNotice,
        tensors: dict[str, np.ndarray],
        *,
        seen: bool,
        chunks: bytes | None = None,
    ) -> None:
        """``seen``: the device's answer of this update id is kept (``device``: the topic's;
        another in the header is refused first)."""
        rnd = self.current
        reason = intake.validate(
            header,
            topic_device=device,
            round_=None
            if rnd is None
            else intake.OpenRoundView(rnd.round_id, rnd.selected, rnd.answered),
            model_version=self.version,
            seen=seen,
            codec=self._expected_codec if rnd is None or rnd.secure is None else "secagg",
        )
        delta: dict[str, np.ndarray] = {}
        if reason is None and rnd is not None and isinstance(rnd.acc, SecureSum):
            if isinstance(header, UpdateHeader):
                # Unmask comes later, for the sum only: this input is masked, never decoded.
                try:
                    rnd.acc.add_masked(header.device_id, intake.masked_input(tensors))
                except SecAggError as exc:
                    reason = f"secagg_{exc.reason}"
        elif reason is None and self.he is not None and rnd is not None:  # HE (he_round.py)
            cap = he_round.cap_of(device, self.sample_caps, self.cfg.samples.max_per_device)
            weight = self._weight(header.num_samples)
            delta, reason = self.he.take(rnd.acc, header, tensors, weight, cap)
        elif reason is None and isinstance(header, UpdateHeader):
            shapes = {k: list(w.shape) for k, w in self.weights.items()}
            try:
                delta = intake.decode(header, tensors, shapes)
            except CodecError as exc:
                reason = exc.reason
            if reason is None and rnd is not None and rnd.clip is not None and self._central:
                # Central DP: the sum's sensitivity is the clip whatever a device sent.
                delta = intake.clip(delta, rnd.clip)
        if reason == "wrong_round":
            self._late_spare(header)
        elif reason not in (None, "duplicate") and rnd is not None and device in rnd.answered:
            # Its bytes are the round's (another answer, say): kept with its answer.
            self.store.set_answer_wire(rnd.round_id, device, rnd.wire_up[device])
        if reason is not None:
            # Counted and logged, never stored: a device that was not selected, or garbage,
            # must not grow the state.
            self._reject(
                reason,
                topic,
                f"{header.kind} {header.update_id} from {header.device_id}"
                f" for round {header.round_id}",
            )
            return
        assert rnd is not None
        is_update = isinstance(header, UpdateHeader)
        # Kept with its delta before it counts: a crash after this line resumes the round
        # with it, one before it loses nothing the device will not send again. The chunks it
        # came in go in the same commit: kept until then, they bring it back after a crash.
        with self.store.transaction():
            self.store.record_answer(
                device_id=header.device_id,
                update_id=header.update_id,
                round_id=header.round_id,
                kind=header.kind,
                num_samples=header.num_samples,
                trained=bool(getattr(header, "trained", True)),
                train_loss=getattr(header, "train_loss", None),
                nbytes=nbytes,
                received=self.clock(),
                delta=delta if is_update and rnd.secure is None else None,
                wire=rnd.wire_up[header.device_id],  # this message's bytes and those before
            )
            if chunks is not None:
                self.store.forget_chunks(chunks, device)
        if header.evaluation is not None:
            rnd.evals[header.device_id] = header.evaluation
        if isinstance(header, SkipNotice):
            self._take_skip(rnd, header)
            return
        if not isinstance(rnd.acc, SecureSum):  # (a masked input is in the sum already)
            rnd.acc.add(header.device_id, delta, self._weight(header.num_samples))
        if header.within_clip is not None:
            rnd.within_clip[header.device_id] = header.within_clip
        rnd.counts[header.device_id] = header.num_samples
        if header.train_loss is not None:
            rnd.losses[header.device_id] = header.train_loss

    # -- rounds --------------------------------------------------------------------
    def tick(self) -> None:
        if self.done:
            return
        now = self.clock()
        for gone in self.reassembler.expire():
            self.store.forget_chunks(gone.message_id)
            for key in [k for k in self._chunk_wire if k[1] == gone.message_id]:
                self.stray_bytes += self._chunk_wire.pop(key)
            self._reject(
                f"chunk_{gone.cause}",
                self.topics.updates,
                f"update {gone.message_id.hex()}: "
                f"{gone.missing} of {gone.chunk_count} chunks missing",
            )
        rnd = self.current
        if rnd is not None and isinstance(rnd.acc, SecureSum):
            self._secure_tick(rnd, rnd.acc, now)
        elif rnd is not None:
            target = self.cfg.devices_per_round
            waiting = set(rnd.selected) - rnd.answered
            needed = max(1, math.ceil(self.cfg.quorum * len(rnd.selected)))
            held = sum(1 for s in rnd.skipped.values() if s.trained)
            quorum = bool(rnd.uploaded) and len(rnd.uploaded) + held >= needed
            if (
                not waiting
                or (target and len(rnd.answered) >= target)
                or (quorum and waiting <= self._suspects(rnd))
            ):
                self._finish(now)
            elif now >= rnd.deadline:
                if quorum:
                    self._finish(now)
                else:
                    self._fail(
                        now,
                        f"{len(rnd.uploaded)} of {len(rnd.selected)} update(s) by the deadline,"
                        f" quorum {needed}",
                    )
        if self.current is None and not self.done:
            start = self.schedule.next_start(now, self._last_start)
            if start > now:
                self._tell_start(start, now)
            elif len(self.online) >= self.cfg.min_devices:
                self._announce(now)
            elif now - self._last_wait_log >= self.cfg.wait_log_interval:
                self._last_wait_log = now
                away = sorted(self.known - self.online)
                text = (
                    f"round {self.next_round_id} cannot start: {len(self.online)} of the"
                    f" {self.cfg.min_devices} device(s) it needs are online"
                    f" ({_names(sorted(self.online)) or 'none'})"
                    + (f"; offline: {_names(away)}" if away else "")
                )
                log.warning("%s", text)
                self._note(text)

    def _tell_start(self, start: float, now: float) -> None:
        """Say once (not every tick) when the schedule lets the next round start."""
        if start != self._told_start:
            self._told_start = start
            text = (
                f"round {self.next_round_id} at {self.schedule.local(start, now)}"
                f" ({self.schedule.describe()})"
            )
            log.info("%s", text)
            self._note(text)

    def _note(self, text: str) -> None:
        """What the aggregator waits for, for ``systemctl status`` (``on_note``)."""
        if self.on_note is not None:
            self.on_note(text)

    def _select(self) -> list[str]:
        """Online devices. With ``devices_per_round``, the most reliable first (recent answer
        rate), over-selected by ``overselect``: the round closes once the target has
        answered. Among equally reliable devices the one selected longest ago goes first
        (random among those never selected or selected in the same round): a rotation, so
        that in a fleet of reliable devices each is selected once every N / k rounds. A
        random draw left a device out for many rounds now and then, which on a non-IID
        fleet pulls the model towards the others' data (bench/README.md, Fewer wakes). A
        device left out for REVISIT_AFTER rounds ranks as untried again: left out for good,
        one with a run of chance dropouts would take its data out of the model
        (bench/README.md, Faults), and a hung one is not waited for anyway."""
        # Not quiet devices that rest (unless none would be left: aggregator/inbox.py).
        online = self.inboxes.selectable(self.next_round_id, self.online, 1)
        k = self.cfg.devices_per_round
        if not k:
            return online
        want = min(len(online), math.ceil(k * self.cfg.overselect))
        if self.privacy is not None:
            # Uniform: amplification by sampling needs every device equally likely to be
            # picked (ranking by reliability would not be, though it depends on no data).
            picked = self.rng.choice(len(online), size=want, replace=False)
            return sorted(online[i] for i in picked)
        order = self.rng.permutation(len(online))
        ranked = sorted(
            (-self._standing(online[i]), self._last_selected(online[i]), j, online[i])
            for j, i in enumerate(order)
        )
        return sorted(d for *_, d in ranked[:want])

    def _last_selected(self, device: str) -> int:
        """The round that last selected the device (its newest outcome); -1: none kept."""
        recent = self.history.get(device)
        return recent[-1][0] if recent else -1

    def _standing(self, device: str) -> float:
        """The selection rank: recent answer rate; 1 when untried or not tried lately."""
        recent = self.history.get(device)
        if not recent or self.next_round_id - recent[-1][0] > REVISIT_AFTER:
            return 1.0
        return sum(ok for _, ok in recent) / len(recent)

    def misses_in_a_row(self, device: str) -> int:
        """How many of its last selections, up to now, the device missed."""
        recent = self.history.get(device, [])
        return next((i for i, (_, ok) in enumerate(reversed(recent)) if ok), len(recent))

    def _suspects(self, rnd: OpenRound) -> set[str]:
        """Selected devices that missed their last rounds: not waited for once everyone
        else has answered and the quorum is met (a hung device must not hold every round up
        to its deadline; one that answers in time still counts)."""
        return {d for d in rnd.selected if self.misses_in_a_row(d) >= PROBATION_AFTER}

    def _note_outcomes(self, rnd: OpenRound, now: float) -> None:
        """Remember who answered in time, in memory and in the store."""
        outcomes = {d: d in rnd.answered for d in rnd.selected}
        self._record_outcomes(rnd.round_id, outcomes)
        spares = {d for d, ok in outcomes.items() if not ok}
        if spares and now < rnd.deadline:
            # Rounds back to back that close at their target: the next often closes before
            # this one's deadline, and its spares may still answer in time.
            self._spares[rnd.round_id] = (rnd.deadline, spares)
        self._forget_spares(now)

    def _record_outcomes(self, round_id: int, outcomes: dict[str, bool]) -> None:
        self.store.record_outcomes(round_id, outcomes, keep=HISTORY)
        for device, ok in outcomes.items():
            kept = [o for o in self.history.get(device, []) if o[0] != round_id]
            self.history[device] = sorted([*kept, (round_id, ok)])[-HISTORY:]

    def _late_spare(self, header: UpdateHeader | SkipNotice) -> None:
        """A round that closed at its target did not wait for its spares. One whose answer
        comes by that round's deadline was late for nothing it could know: it answered in
        time, and is not ranked down as a device that misses rounds (counted a miss, the
        slowest of each round, e.g. the one with the most data to train on, would sit out
        the next rounds for nothing). A quiet device's late skip notice may declare a rest:
        it sits out the rounds after the one it skipped, however late the notice came."""
        device, round_id = header.device_id, header.round_id
        if isinstance(header, SkipNotice) and header.rest:
            selected = any(r == round_id for r, _ in self.history.get(device, ()))
            if selected and round_id + header.rest > self.inboxes.rest_until.get(device, 0):
                self.inboxes.note_rest(device, round_id, header.rest)
        self._forget_spares(self.clock())
        kept = self._spares.get(round_id)
        if kept is not None and device in kept[1]:
            kept[1].discard(device)
            self._record_outcomes(round_id, {device: True})

    def _forget_spares(self, now: float) -> None:
        """Rounds past their deadline: a spare's answer is a miss now. At most HISTORY kept."""
        for round_id in sorted(self._spares):
            deadline, spares = self._spares[round_id]
            if deadline < now or not spares or len(self._spares) > HISTORY:
                del self._spares[round_id]

    def _announce(self, now: float) -> None:
        selected = self._select()
        rate = len(selected) / max(1, len(self.online))
        if self.privacy is not None and not self._account(selected, rate):
            return
        deadline = now + self.cfg.round_timeout
        secure = None
        if self.cfg.secure is not None:
            secure = self._secure_round(self.next_round_id, selected, now, deadline)
            if secure is None:
                return
        rnd = OpenRound(
            self.next_round_id,
            selected,
            now,
            deadline,
            self._accumulator() if secure is None else secure[1],
            secure=None if secure is None else secure[0],
        )
        if self.privacy is not None:
            rnd.clip, rnd.sampling_rate = self.clip, rate
            with self.store.transaction():
                self.store.set_meta("privacy_open_clip", repr(rnd.clip))
                self.store.set_meta("privacy_open_rate", repr(rate))
                self.store.set_meta("privacy_ledger", self.ledger.to_json())
        self._last_start = now
        self.next_round_id += 1
        self.current = rnd
        self.store.open_round(rnd.round_id, self.version, now, rnd.deadline, selected)
        self._publish_announcement(rnd)
        self._count_idle(rnd)
        self._keep_open_round(rnd)
        log.info(
            "round %d announced to %d device(s) on model v%d",
            rnd.round_id,
            len(selected),
            self.version,
        )

    def _keep_open_round(self, rnd: OpenRound) -> None:
        """For the round's record if it is resumed: after a restart no status is known yet."""
        kept = {
            "round": rnd.round_id,
            "listening": rnd.listening,
            "sleeping": rnd.sleeping,
            "resting": rnd.resting,
            "bytes_down": rnd.wire_down,
            "inboxes": rnd.wire_down_by_device,
        }
        self.store.set_meta("open_round", json.dumps(kept))

    def _announcement(self, rnd: OpenRound) -> RoundAnnouncement:
        return RoundAnnouncement(
            fleet=self.cfg.fleet,
            round_id=rnd.round_id,
            model_version=self.version,
            deadline=rnd.deadline,
            selected=tuple(rnd.selected),
            config=self._training(rnd),
            model_checksum=None
            if self.shadow is None or self.shadow.version != self.version
            else checksum(self.shadow.weights),
        )

    def _publish_announcement(self, rnd: OpenRound) -> None:
        payload = self._signed(encode(self._announcement(rnd)), "round")
        self.link.publish(self.topics.round, payload, qos=1, retain=True)
        # What each selected device receives for this round: the announcement and the
        # global model it trains on (each a QoS 1 PUBLISH, acknowledged by a PUBACK); again
        # when a restart sends them again.
        rnd.wire_down += (
            publish_size(self.topics.round, len(payload), 1)
            + self._global_wire_size
            + 2 * PUBACK_SIZE
        )
        # Quiet devices get theirs in their inboxes; the others online hear it anyway.
        inboxes = self.inboxes
        for device in rnd.selected:
            if device in inboxes.quiet:
                rnd.wire_down_by_device[device] = inboxes.deliver(
                    device, payload, self.version, self._inbox_model
                )
        # ...and so do quiet devices that still listen to every round: the announcement in
        # their inbox too, the proof that it works (aggregator/inbox.py).
        for device in sorted((inboxes.listening & self.online) - set(rnd.selected)):
            inboxes.probe(device, payload)
            rnd.probed.add(device)

    def _count_idle(self, rnd: OpenRound) -> None:
        """Who of those online the round did not select: listening (not quiet, or quiet
        but still listening to every round) or asleep (quiet)."""
        selected = set(rnd.selected)
        idle = [d for d in self.online if d not in selected]
        inboxes = self.inboxes
        rnd.asleep = {d for d in idle if d in inboxes.quiet and d not in inboxes.listening}
        rnd.sleeping = len(rnd.asleep)
        rnd.listening = len(idle) - rnd.sleeping
        rnd.resting = sorted(self.inboxes.resting(rnd.round_id, idle))
        rnd.idle_known = True

    def _record_fields(self, rnd: OpenRound) -> dict:
        """The round record's fields on who was online, and which figures are partial (a
        resumed round: what came before the restart is not all kept)."""
        if not rnd.idle_known:
            self._count_idle(rnd)  # those online at the close: the best left to count
        fields = _quiet_fields(rnd)
        partial = [f for f in rnd.partial if f != "bytes_down_by_device" or f in fields]
        if partial:
            fields["partial"] = partial
        return fields

    def _inbox_model(self) -> bytes:
        """The whole model for a quiet device's inbox: the devices' copy under compact
        globals (the deltas that follow apply to it), else the global model."""
        shadow = self.shadow
        current = shadow is not None and shadow.version == self.version
        weights = shadow.weights if shadow is not None and current else self.weights
        if self.he is not None:  # homomorphic encryption: E_t, as on ``global``
            weights = self.he.tensors()
        header = GlobalModelHeader(fleet=self.cfg.fleet, model_version=self.version, round_id=0)
        return self._signed(encode(header, weights), "global")

    def _accumulator(self) -> Accumulator | ShardedSum | he_round.HeAccumulator:
        """A running sum for the plain mean; the deltas themselves for a robust combiner."""
        if self.he is not None:  # homomorphic encryption: the encrypted sum (he_round.py)
            return self.he.accumulator()
        if self.shards is not None:
            return self.shards.accumulator()
        keep = getattr(self.strategy.combiner, "needs_all_deltas", True)
        return make_accumulator(self.weights, keep_deltas=keep)

    def _take_skip(self, rnd: OpenRound, notice: SkipNotice) -> None:
        """A device that trained and held its update back weighs in with a zero delta (it
        is in its residual); averaging over the uploaders alone is unstable."""
        rnd.skipped[notice.device_id] = notice
        self.inboxes.note_rest(notice.device_id, rnd.round_id, notice.rest)
        if notice.trained and notice.num_samples > 0:
            rnd.acc.hold(notice.device_id, self._weight(notice.num_samples))

    # -- differential privacy (aggregator/privacy.py, aggregator/accounting.py) ---------
    @property
    def _central(self) -> bool:
        return self.privacy is not None and self.privacy.mode == "central"

    def _weight(self, num_samples: int) -> int:
        """An update's weight in the sum: its sample count; 1 under DP (uniform) and in
        secure rounds (the aggregator sees only the sum)."""
        return 1 if self.privacy is not None or self.cfg.secure is not None else num_samples

    def _training(self, rnd: OpenRound) -> TrainingConfig:
        """The [training] table a round announces; under DP with the round's clip (and,
        under local DP, the noise each device adds)."""
        p = self.privacy
        training = self.cfg.training
        if rnd.secure is not None:
            training = training.model_copy(update={"secure": rnd.secure})
        if p is None or rnd.clip is None:
            return training
        noise = p.noise_multiplier if p.mode == "local" else 0.0
        settings = PrivacySettings(clip=rnd.clip, noise_multiplier=noise)
        return training.model_copy(update={"privacy": settings})

    def _account(self, selected: list[str], rate: float) -> bool:
        """Count the round about to start in the privacy ledger (by selection: a device
        that then skips or drops counts too) and keep the ledger; False, and training
        stops (no new rounds, said once in the log and in ``budget_stop``), when the round
        would take epsilon past the budget."""
        p = self.privacy
        assert p is not None
        if p.epsilon_budget is not None:
            after = self.ledger.preview(q=rate, devices=selected)
            if after > p.epsilon_budget:
                self.budget_stop = (
                    f"round {self.next_round_id} would take epsilon to {after:.3f} at delta"
                    f" {p.target_delta:g}, over the budget of {p.epsilon_budget:g}"
                    f" (spent {self.ledger.epsilon():.3f} in {self.ledger.rounds} round(s))"
                )
                log.warning("privacy budget reached: %s; training stops", self.budget_stop)
                self._note(f"training stopped: {self.budget_stop}")
                self.done = True
                return False
        self.ledger.add_round(q=rate, devices=selected)
        return True

    def _private_mean(self, rnd: OpenRound, used: dict[str, int]) -> dict[str, np.ndarray]:
        """Central DP: the unweighted sum of the clipped updates plus Gaussian noise, over
        the number of devices selected (aggregator/privacy.py)."""
        assert isinstance(rnd.acc, (RunningSum, SecureSum)) and rnd.clip is not None
        total = rnd.acc.weighted_sum(used, lambda device: {})
        return privacy.noised_mean(
            total,
            std=self.value_noise * rnd.clip,
            denominator=len(rnd.selected),
            rng=self.noise_rng,
        )

    def _spend(self, rnd: OpenRound, published: bool) -> dict:
        """Move the adaptive clip (if the round published a model) and keep it; the
        summary's ``privacy``, with epsilon so far (the round was counted when announced)."""
        p = self.privacy
        assert p is not None and rnd.clip is not None
        record: dict = {
            "mode": p.mode,
            "noise_multiplier": p.noise_multiplier,
            "clip": rnd.clip,
            "sampling_rate": round(rnd.sampling_rate, 6),
        }
        if p.mode == "central":
            if published and p.target_quantile is not None:
                fraction = privacy.unclipped_fraction(
                    [rnd.within_clip[d] for d in sorted(rnd.within_clip)],
                    std=self.count_noise,
                    rng=self.noise_rng,
                )
                self.clip = privacy.next_clip(
                    rnd.clip, fraction, target=p.target_quantile, lr=p.clip_lr
                )
                record["unclipped_fraction"] = round(fraction, 4)
                record["next_clip"] = self.clip
            record["value_noise_multiplier"] = self.value_noise
        self.store.set_meta("privacy_clip", repr(self.clip))
        record["epsilon"] = self.ledger.epsilon()
        record["delta"] = p.target_delta
        record["rounds_accounted"] = self.ledger.rounds
        return record

    # -- secure aggregation (aggregator/secure.py, docs/secure-aggregation.md) ------------
    def _secure_round(
        self, round_id: int, selected: list[str], now: float, deadline: float
    ) -> tuple[SecureSettings, SecureSum] | None:
        """The settings a secure round announces (a fresh public seed) and its sum; None
        (and training stops, said in the log) when they make no valid round."""
        c = self.cfg.secure
        assert c is not None
        settings = SecureSettings(
            seed=secrets.token_hex(32),
            threshold=c.threshold,
            degree=c.degree,
            bits=c.bits,
            clip=c.clip,
        )
        t = self.cfg.training
        size = sum(int(np.size(w)) for w in self.weights.values())
        spec = parse_codec(t.codec).with_min_entries(size, t.topk_min_entries)
        shapes = {k: tuple(w.shape) for k, w in self.weights.items()}
        try:
            plan = secure_round(self.cfg.fleet, round_id, selected, settings, shapes, spec)
        except SecAggError as exc:
            log.error("[secure] makes no valid round of %d device(s): %s", len(selected), exc)
            self._note(f"training stopped: [secure]: {exc}")
            self.done = True
            return None
        acc = SecureSum(plan, started=now, deadline=deadline, stage_timeout=c.stage_timeout)
        return settings, acc

    def _on_secagg(self, topic: str, device: str, payload: bytes, wire: int) -> None:
        """A device's secure-aggregation stage message (advertise, shares, unmask)."""
        rnd = self.current
        if rnd is None or not isinstance(rnd.acc, SecureSum):
            self.stray_bytes += wire
            self._reject("secagg_wrong_round", topic, f"from {device}: no secure round open")
            return
        rnd.wire_up[device] += wire
        try:
            rnd.acc.add_stage(device, payload)
        except SecAggError as exc:
            self._reject(f"secagg_{exc.reason}", topic, f"from {device}: {exc}")

    def _secure_tick(self, rnd: OpenRound, acc: SecureSum, now: float) -> None:
        stage = acc.stage
        try:
            out = acc.advance(now, rnd.selected, set(rnd.skipped))
        except SecAggAbort as exc:
            self._fail(now, f"secure aggregation aborted at {stage} ({exc})")
            return
        down = 0
        for device, message in out.to_devices.items():
            payload = self._signed(address(device, message), "secagg")
            self.link.publish(self.topics.secagg(device), payload, qos=1)
            down = max(down, publish_size(self.topics.secagg(device), len(payload), 1))
        if out.to_all is not None:
            payload = self._signed(address("", out.to_all), "secagg")
            self.link.publish(self.topics.secagg_all, payload, qos=1)
            down = max(down, publish_size(self.topics.secagg_all, len(payload), 1))
        if down:
            rnd.wire_down += down + PUBACK_SIZE
            log.debug("round %d: secure aggregation past %s", rnd.round_id, out.stage)
        if acc.finished:
            self._finish(now)

    def _secure_summary(self, rnd: OpenRound, acc: SecureSum) -> dict:
        p = acc.plan.params
        server = acc.server
        return {
            "stage": acc.stage,
            "degree": p.degree,
            "threshold": p.threshold,
            "bits": p.bits,
            "ring_bits": p.k,
            "clip": p.clip,
            "entries": p.length,
            "advertised": len(server.u1 or server.advertised),
            "shared": len(server.u2 or server.shared),
            "survivors": len(server.u3),
            "dropped_after_sharing": len(server.u2 - server.u3) if server.u3 else 0,
        }

    def _republish_global(self, why: str) -> None:
        """Send the current global again (retained): a device lacks it, or a round failed.

        At most once per ``republish_interval`` seconds per model version, however many
        devices ask; a newer version goes out at once (on brokers that do not keep the order
        between topics, such as NATS, a device often sees the round before its model and asks).
        """
        now = self.clock()
        recent = now - self._last_republish < self.cfg.republish_interval
        if recent and self._republished_version == self.version:
            return
        self._last_republish = now
        self._republished_version = self.version
        self._publish_global(round_id=0)
        self.republished += 1
        if self.current is not None:  # every device that hears the round gets it again
            self.current.wire_down += self._global_wire_size + PUBACK_SIZE
        log.warning("sent global model v%d again: %s", self.version, why)

    def _publish_global(self, round_id: int) -> None:
        header = GlobalModelHeader(
            fleet=self.cfg.fleet, model_version=self.version, round_id=round_id
        )
        tensors = self.weights if self.he is None else self.he.tensors()  # HE: E_t
        payload = self._signed(encode(header, tensors), "global")
        self.link.publish(self.topics.global_model, payload, qos=1, retain=True)
        self._global_wire_size = publish_size(self.topics.global_model, len(payload), 1)
        self.inboxes.model_published(self.version, None)
        if self.cfg.downlink is not None:
            if self.shadow is None:
                self.shadow = Shadow(self.weights, self.version)
            else:
                self.shadow.sync(self.weights, self.version)
            self._last_full = self.version

    def _publish_model(self, round_id: int) -> None:
        """A new global model: whole, or (``[downlink]``) as the change to the devices' copy
        until ``resync_every`` versions have gone by since the last full sync."""
        d = self.cfg.downlink
        if d is None or self.shadow is None or self.version - self._last_full >= d.resync_every:
            self._publish_global(round_id)
            return
        header, tensors = self.shadow.advance(
            self.weights,
            version=self.version,
            round_id=round_id,
            spec=parse_codec(d.codec),
            fleet=self.cfg.fleet,
            rng=self.rng,
        )
        payload = self._signed(encode(header, tensors), "global_delta")
        self.link.publish(self.topics.global_delta, payload, qos=1, retain=True)
        self._global_wire_size = publish_size(self.topics.global_delta, len(payload), 1)
        self.inboxes.model_published(self.version, payload)
        self.deltas_sent += 1

    def _signed(self, envelope: bytes, kind: str) -> bytes:
        if self.signing_key is None:
            return envelope
        return sign(envelope, self.signing_key, fleet=self.cfg.fleet, kind=kind)

    def _finish(self, now: float) -> None:
        rnd = self.current
        assert rnd is not None
        participants = sorted(rnd.uploaded)
        new_model = False
        announced = self.version  # the model the round's devices trained on and evaluated
        # A device whose update was too small to send counts as a zero delta with its
        # samples (it is in its residual); averaging over the uploaders alone is unstable.
        held = sorted(d for d, s in rnd.skipped.items() if s.trained and s.num_samples > 0)
        declared = {d: rnd.counts[d] for d in participants}
        declared.update({d: rnd.skipped[d].num_samples for d in held})
        limits = self.cfg.samples
        bounded = bound_samples(
            # Under DP, and in a secure round, every device weighs 1: nothing to bound.
            declared if self._weight(2) == 2 else dict.fromkeys(declared, 1),
            caps=self.sample_caps,
            max_per_device=limits.max_per_device,
            # HE: a count is fixed inside its ciphertext; over a fixed cap it was refused.
            median_factor=limits.median_factor if self.he is None else 0.0,
        )
        if self.shards is not None and not self.shards.merged(self, rnd, bounded.used, now):
            return  # waiting for the workers' partial sums (a later tick closes the round)
        if bounded.clipped:
            self.samples_clipped += len(bounded.clipped)
            log.warning(
                "round %d: clipped declared sample counts %s to %s",
                rnd.round_id,
                bounded.clipped,
                {d: bounded.used[d] for d in bounded.clipped},
            )
        counts = [bounded.used[d] for d in participants]
        if participants:
            before = self.strategy.state()
            with np.errstate(over="ignore", invalid="ignore"):
                if self.he is not None:  # HE: E_t from E_{t-1} and the round's sum, blind
                    combined = self.he.advance(rnd.acc)
                elif self._central:
                    combined = self._private_mean(rnd, bounded.used)
                else:
                    combined = rnd.acc.mean(
                        bounded.used,
                        lambda device: self.store.answer_delta(rnd.round_id, device),
                        self.strategy.combiner,
                    )
                candidate = self.strategy.apply(self.weights, combined)
            if not all(np.isfinite(w).all() for w in candidate.values()):
                # Finite updates can still add up to infinity: publishing that would leave
                # every agent refusing the model for good. The round fails; nothing changes.
                self.strategy.load_state(before)
                self._fail(now, "the average of its updates is not finite")
                return
            self.weights = candidate
            self.version += 1
            new_model = True
        summary: dict = {
            "round": rnd.round_id,
            "fleet": self.topics.fleet,
            "status": "done",
            "model_version": self.version,
            "selected": len(rnd.selected),
            "participants": participants,
            "skipped": sorted(rnd.skipped),
            "skip_reasons": dict(Counter(s.reason for s in rnd.skipped.values())),
            "skip_reason_by_device": {d: s.reason for d, s in sorted(rnd.skipped.items())},
            "bytes_up_by_device": dict(sorted(rnd.wire_up.items())),
            "bytes_down_per_device": rnd.wire_down,
            **self._record_fields(rnd),
            "missing": sorted(set(rnd.selected) - rnd.answered),
            "num_samples": int(sum(counts)),
            # The weight each device's update (or held-back zero delta) had in the average,
            # and what the clipped ones had declared.
            "weights": dict(sorted(bounded.used.items())),
            "samples_clipped": dict(sorted(bounded.clipped.items())),
            "train_loss": (
                float(
                    np.average(
                        [rnd.losses[d] for d in participants if d in rnd.losses],
                        weights=[bounded.used[d] for d in participants if d in rnd.losses],
                    )
                )
                if any(d in rnd.losses for d in participants)
                else None
            ),
            "bytes_received": rnd.bytes_received,
            "duration_s": round(now - rnd.started, 3),
        }
        if isinstance(rnd.acc, SecureSum):
            summary["secure"] = self._secure_summary(rnd, rnd.acc)
        scored = fed_eval.combine(rnd.evals, bounded.used, announced)
        if scored is not None:
            summary["fed_eval"] = scored
        if self.he is not None:  # homomorphic encryption: no held-out evaluation
            summary["he"] = he_round.SUMMARY
        if self.evaluator is not None:
            loss, metric = self.evaluator(self.weights)
            # classifiers report accuracy; regression models (forecasters) the mean abs. error
            summary[getattr(self.evaluator, "metric_name", "accuracy")] = metric
            summary["loss"] = loss
        # The model, the strategy's state and the round's record are one transaction: a crash
        # in between must not resume at a model with a reset FedAdam state or an "abandoned"
        # round that produced it.
        with self.store.transaction():
            if self.privacy is not None:
                summary["privacy"] = self._spend(rnd, new_model)
            if new_model:
                self.store.save_model(self.version, rnd.round_id, self.weights)
                self.store.save_strategy_state(self.version, self.strategy.state())
                if self.he is not None:  # E_t beside the template (he_round.py)
                    self.he.save(self.store, self.version)
            self.store.close_round(rnd.round_id, "done", now, summary)
            self.store.compact(rnd.round_id, keep_from_version=self.version - KEEP_MODELS + 1)
        if new_model:
            self._publish_model(rnd.round_id)
            if self.shadow is not None:
                summary["downlink"] = {
                    "sent": "full" if self._last_full == self.version else "delta",
                    "bytes": self._global_wire_size,
                    "error_bound": self.shadow.error_bound,
                }
        self._close(rnd, "done", now, summary, stored=True)
        self.completed += 1
        if self.cfg.backup_every and self.completed % self.cfg.backup_every == 0:
            self._backup()
        self._check_done()

    def _backup(self) -> None:
        try:
            path = self.store.backup()
        except (OSError, sqlite3.Error) as exc:
            log.error("cannot back up the state to %s: %s", self.store.backup_path, exc)
            return
        log.info("state backed up to %s", path)

    def _fail(self, now: float, why: str) -> None:
        rnd = self.current
        assert rnd is not None
        log.warning("round %d failed: %s", rnd.round_id, why)
        summary = {
            "round": rnd.round_id,
            "fleet": self.topics.fleet,
            "status": "failed",
            "why": why,
            "model_version": self.version,
            "selected": len(rnd.selected),
            "participants": sorted(rnd.uploaded),
            "skipped": sorted(rnd.skipped),
            "missing": sorted(set(rnd.selected) - rnd.answered),
            "bytes_received": rnd.bytes_received,
            "bytes_up_by_device": dict(sorted(rnd.wire_up.items())),
            "bytes_down_per_device": rnd.wire_down,
            **self._record_fields(rnd),
            "duration_s": round(now - rnd.started, 3),
        }
        if isinstance(rnd.acc, SecureSum):
            summary["secure"] = self._secure_summary(rnd, rnd.acc)
        if self.privacy is not None:
            with self.store.transaction():
                summary["privacy"] = self._spend(rnd, published=False)
        self._close(rnd, "failed", now, summary)
        # Devices that missed the round may lack the model it was for (a new device, a lost
        # retained copy): send it again before the next announcement.
        self._republish_global(f"round {rnd.round_id} failed")

    def _close(
        self, rnd: OpenRound, status: str, now: float, summary: dict, *, stored: bool = False
    ) -> None:
        if not stored:
            self.store.close_round(rnd.round_id, status, now, summary)
        self._note_outcomes(rnd, now)
        self.current = None
        _append_jsonl(self.cfg.log_path, summary)
        log.info("%s", describe_round(summary))
        log.debug("round %d: %s", rnd.round_id, json.dumps(summary))
        self.on_round(summary)


def _quiet_fields(rnd: OpenRound) -> dict:
    """Who else was online, for the energy estimate (a device that hears a round wakes its
    radio): devices listening to every round, quiet ones asleep, and the rests declared;
    and what the selected quiet devices' inboxes got (before a restart, and after it)."""
    fields: dict = {"listening": rnd.listening, "sleeping": rnd.sleeping}
    if rnd.resting:
        fields["resting"] = rnd.resting
    inboxes = Counter(rnd.inbox_before) + Counter(rnd.wire_down_by_device)
    if inboxes:
        fields["bytes_down_by_device"] = dict(sorted(inboxes.items()))
    return fields


def _append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        end = fh.seek(0, os.SEEK_END)
        if end:  # after a line a crash cut short, the record starts a line of its own
            fh.seek(end - 1)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
        fh.write(json.dumps(record).encode() + b"\n")


def _shape_difference(ours: dict[str, tuple], theirs: dict[str, tuple]) -> str:
    for name in sorted(set(ours) | set(theirs)):
        if ours.get(name) != theirs.get(name):
            state, model = ours.get(name, "absent"), theirs.get(name, "absent")
            return f"tensor {name}: {state} in the state, {model} in the model"
    return "the same tensors"


def _names(names: list[str], most: int = 10) -> str:
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def _kb(nbytes: float) -> str:
    return f"{nbytes / 1000:.1f} kB"


def describe_round(summary: dict) -> str:
    """One line an operator reads: what a round did (rounds.jsonl has everything)."""
    selected = summary.get("selected", 0)
    trained = len(summary.get("participants", []))
    reasons = summary.get("skip_reasons") or {}
    skipped = len(summary.get("skipped", []))
    missing = summary.get("missing", [])
    head = f"round {summary['round']} {summary['status']}"
    if summary.get("why"):
        head += f" ({summary['why']})"
    parts = [f"{trained} of {selected} trained"]
    if skipped:
        why = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items()))
        parts.append(f"{skipped} skipped" + (f" ({why})" if why else ""))
    parts.append(f"{len(missing)} missing" + (f" ({_names(missing, 5)})" if missing else ""))
    line = f"{head}: " + ", ".join(parts)
    scores = []
    if summary.get("accuracy") is not None:
        scores.append(f"accuracy {100 * summary['accuracy']:.2f}%")
    if summary.get("mae") is not None:
        scores.append(f"MAE {summary['mae']:.4f}")
    if summary.get("loss") is not None:
        scores.append(f"loss {summary['loss']:.4f}")
    if scores:
        line += "; " + ", ".join(scores)
    fed = summary.get("fed_eval")
    if fed:
        if fed.get("accuracy") is not None:
            score = f"accuracy {100 * fed['accuracy']:.2f}%"
        else:
            score = f"MAE {fed.get('mae', float('nan')):.4f}"
        line += f"; fed eval {score} of v{fed.get('model_version')} (n={fed.get('count')})"
    if summary.get("he"):
        line += "; model encrypted (HE)"
    dp = summary.get("privacy")
    if dp:
        line += f"; epsilon {dp['epsilon']:.3f} (delta {dp['delta']:g}, {dp['mode']} DP)"
    line += (
        f"; up {_kb(summary.get('bytes_received', 0))},"
        f" down {_kb(summary.get('bytes_down_per_device', 0))} per device"
        f"; {summary.get('duration_s', 0):.1f} s; model v{summary.get('model_version')}"
    )
    return line

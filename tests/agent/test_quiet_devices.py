"""Quiet devices end to end over the in-memory link: a real aggregator sends each quiet
device the rounds it is selected for, and the model it lacks, on its inbox alone; devices
that are not selected hear nothing once their inbox has brought its first message; a device
whose gate holds its update back rests the rounds it declared, and the records count it as
resting, never as missing."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fedge.agent.daemon import Agent
from fedge.agent.dataset import Dataset
from fedge.aggregator.config import AggregatorConfig
from fedge.aggregator.coordinator import Aggregator
from fedge.aggregator.store import Store
from fedge.aggregator.strategies.config import StrategyConfig
from fedge.models.runtime import load_runtime
from fedge.protocol import (
    GateSettings,
    MemoryBroker,
    MemoryLink,
    Message,
    RoundAnnouncement,
    Topics,
    TrainingConfig,
    encode,
    sign,
)
from fedge.protocol.signing import verify_key
from helpers import DIGITS_MODEL, serve_rounds

pytestmark = pytest.mark.link
FLEET = "quiet"
KEY = Ed25519PrivateKey.generate()


class CountingLink(MemoryLink):
    """A MemoryLink that counts what reaches it, by topic: what would wake a radio; ``late``:
    what reached it after it stopped listening to the rounds."""

    def __init__(self, broker: MemoryBroker, client_id: str) -> None:
        super().__init__(broker, client_id)
        self.heard: Counter[str] = Counter()
        self.late: Counter[str] | None = None

    def deliver(self, message: Message) -> None:
        self.heard[message.topic] += 1
        if self.late is not None:
            self.late[message.topic] += 1
        super().deliver(message)

    def unsubscribe(self, topic_filter: str) -> None:
        super().unsubscribe(topic_filter)
        if topic_filter == Topics(FLEET).round:
            self.late = Counter()


def agent(
    broker: MemoryBroker, device: str, seed: int, *, quiet: bool, rest: int = 0, pinned: bool = True
) -> Agent:
    rng = np.random.default_rng(seed)
    a = Agent(
        device_id=device,
        fleet=FLEET,
        link=CountingLink(broker, device),
        runtime=load_runtime(DIGITS_MODEL, prefer=("numpy",)),
        data=Dataset(rng.random((40, 64), np.float32), rng.integers(0, 10, 40).astype(np.int32)),
        rng=np.random.default_rng(seed),
        trusted_keys=[verify_key(KEY)] if pinned else [],
        quiet=quiet,
        rest_rounds=rest,
    )
    a.start()
    return a


def aggregator(tmp_path: Path, broker: MemoryBroker, **config: object) -> Aggregator:
    base: dict[str, object] = {
        "fleet": FLEET,
        "model": DIGITS_MODEL,
        "state_dir": tmp_path,
        "min_devices": 1,
        "strategy": StrategyConfig(name="fedavg"),
        "downlink": {"codec": "int8", "resync_every": 100},
    }
    agg = Aggregator(
        AggregatorConfig(**(base | config)),
        link=MemoryLink(broker, "aggregator"),
        store=Store(tmp_path / "agg.sqlite"),
        initial_weights=load_runtime(DIGITS_MODEL).get_weights(),
        signing_key=KEY,
        rng=np.random.default_rng(0),
    )
    agg.start()
    return agg


def serve(agg: Aggregator, agents: list[Agent], rounds: int) -> list[dict]:
    """Run until ``rounds`` rounds are done; the round records."""
    serve_rounds(agg, agents, rounds)
    return [json.loads(line) for line in agg.cfg.log_path.read_text().splitlines()]


def answered(record: dict) -> list[str]:
    return record["participants"] + record["skipped"]


@pytest.mark.parametrize("pinned", [True, False], ids=["key pinned", "no key (development)"])
def test_quiet_devices_hear_only_the_rounds_they_are_selected_for(
    tmp_path: Path, pinned: bool
) -> None:
    """The kind of an inbox message is the one its signature verifies as; with no key pinned
    to check it with, its header's."""
    broker = MemoryBroker()
    agg = aggregator(
        tmp_path,
        broker,
        rounds=8,
        devices_per_round=2,
        overselect=1.0,
        training=TrainingConfig(
            batch_size=8, lr=0.1, codec="float32", gate=GateSettings(threshold=0), eval_fraction=0
        ),
    )
    try:
        quiet = [agent(broker, d, i, quiet=True, pinned=pinned) for i, d in enumerate("abcd")]
        loud = agent(broker, "e", 9, quiet=False, pinned=pinned)
        records = serve(agg, [*quiet, loud], 8)
        topics = Topics(FLEET)
        picked = Counter(d for r in records for d in answered(r))
        for a in quiet:
            heard, late = a.link.heard, a.link.late  # type: ignore[attr-defined]
            # Every round until its inbox brought something (the proof that the broker lets
            # it read there), then its inbox alone: no broadcast round or model.
            assert late is not None and set(late) <= {topics.inbox(a.device_id)}, late
            # Nothing refused but, while it listened to every round, a broadcast delta to a
            # version it did not hold. One announcement per round it took part in, and the
            # models it lacked: a delta per version at most (or one whole model instead).
            assert set(a.stats.rejected) <= {"delta_gap"}, a.stats.rejected
            # (and the first round in its inbox though it did not select it, at most)
            assert heard[topics.inbox(a.device_id)] >= picked[a.device_id]
            assert heard[topics.inbox(a.device_id)] <= picked[a.device_id] + agg.version + 1
        for r in records:
            assert r["missing"] == []
            online = r["selected"] + r["listening"] + r["sleeping"]
            assert online == 5
            quiet_picked = [d for d in answered(r) if d != "e"]
            assert sorted(r["bytes_down_by_device"]) == sorted(quiet_picked)
            # In the first round every quiet device still listened to every round.
            e_idle = 0 if "e" in answered(r) else 1
            assert r["listening"] == (e_idle if r["round"] > 1 else 5 - r["selected"])
        # Every device took part at some point; the loud one heard every round.
        assert set(picked) == set("abcde")
        assert loud.link.heard[topics.round] >= 8  # type: ignore[attr-defined]
        # A selected quiet device trained on the model the round named: the deltas it
        # got in its inbox took it there, checksum checked at each step.
        last = records[-1]
        for a in quiet:
            if a.device_id in answered(last):
                assert a.global_version == last["model_version"] - 1
    finally:
        agg.store.close()


def test_a_quiet_device_not_selected_stops_listening_after_one_round(tmp_path: Path) -> None:
    """Until its inbox brings a message a quiet device listens to every round, and its
    statuses say so: the aggregator sends it the first round too, though the round does not
    select it, and counts it as listening, not asleep. From the second round on every one
    sleeps between the rounds it is selected for."""
    broker = MemoryBroker()
    agg = aggregator(
        tmp_path,
        broker,
        rounds=4,
        devices_per_round=1,
        overselect=1.0,
        training=TrainingConfig(
            batch_size=8, lr=0.1, codec="float32", gate=GateSettings(threshold=0), eval_fraction=0
        ),
    )
    try:
        devices = [agent(broker, d, i, quiet=True) for i, d in enumerate("abcd")]
        assert all(d.listening for d in devices)
        first = serve(agg, devices, 1)[0]
        assert first["selected"] == 1 and first["missing"] == []
        # The round came twice to those it did not select (broadcast and inbox): each
        # took it once, and none listens to every round any more.
        for d in devices:
            assert not d.listening, d.device_id
            assert set(d.stats.rejected) <= {"delta_gap"}, d.stats.rejected
        assert (first["listening"], first["sleeping"]) == (3, 0)
        assert agg.inboxes.listening == set()  # their statuses said so
        records = serve(agg, devices, 4)
        topics = Topics(FLEET)
        for d in devices:
            late = d.link.late  # type: ignore[attr-defined]
            assert late is not None and set(late) <= {topics.inbox(d.device_id)}, late
            # Each round taken once: trained when selected, ignored when not.
            assert d.stats.rounds_trained == sum(d.device_id in answered(r) for r in records)
            assert set(d.stats.rejected) <= {"delta_gap"}, d.stats.rejected
        for r in records[1:]:
            assert (r["listening"], r["sleeping"], r["missing"]) == (0, 3, [])
    finally:
        agg.store.close()


def test_a_gate_skip_rests_and_is_not_a_dropout(tmp_path: Path) -> None:
    broker = MemoryBroker()
    agg = aggregator(
        tmp_path,
        broker,
        rounds=6,
        training=TrainingConfig(
            batch_size=8,
            lr=0.1,
            codec="float32",
            # Every update is "too small": each device skips, and rests 2 rounds after.
            gate=GateSettings(threshold=1000, max_skips=100),
            eval_fraction=0,
        ),
    )
    try:
        devices = [agent(broker, d, i, quiet=True, rest=2) for i, d in enumerate("abc")]
        records = serve(agg, devices, 6)
        assert answered(records[0]) == ["a", "b", "c"]
        assert records[0]["skip_reasons"] == {"small_update": 3}
        for r in records:
            assert r["missing"] == []
        # Round 2: everyone rests; the one whose rest ends first is woken early.
        assert records[1]["selected"] == 1 and records[1]["sleeping"] == 2
        assert len(records[1]["resting"]) == 2
        # Over the six rounds each device answered about one round in three (it rests two).
        counts = Counter(d for r in records for d in answered(r))
        assert sum(counts.values()) < 3 * 6 / 2
        assert all(r["selected"] + r["sleeping"] == 3 for r in records)
        for a in devices:
            assert a.stats.skipped["small_update"] == counts[a.device_id]
    finally:
        agg.store.close()


def test_inbox_messages_are_checked_like_broadcast_ones(tmp_path: Path) -> None:
    broker = MemoryBroker()
    device = agent(broker, "a", 1, quiet=True)
    topics = Topics(FLEET)
    ann = RoundAnnouncement(
        fleet=FLEET,
        round_id=1,
        model_version=0,
        deadline=4e9,
        selected=("a",),
        config=TrainingConfig(),
    )
    sender = MemoryLink(broker, "intruder")
    sender.connect()
    attacker = Ed25519PrivateKey.generate()
    sender.publish(topics.inbox("a"), sign(encode(ann), attacker, fleet=FLEET, kind="round"))
    sender.publish(topics.inbox("a"), encode(ann))  # unsigned
    # Signed by the fleet's key, but for another kind: not a round announcement.
    sender.publish(topics.inbox("a"), sign(encode(ann), KEY, fleet=FLEET, kind="secagg"))
    while device.step(0):
        pass
    assert device.stats.rejected == Counter(unknown_key=1, unsigned=1, bad_signature=1)
    assert device.state.round_seen == 0
    # The real thing goes through.
    sender.publish(topics.inbox("a"), sign(encode(ann), KEY, fleet=FLEET, kind="round"))
    while device.step(0):
        pass
    assert device.state.round_seen == 1


def test_a_quiet_device_that_restarts_mid_round_gets_the_round_again(tmp_path: Path) -> None:
    broker = MemoryBroker()
    agg = aggregator(
        tmp_path,
        broker,
        rounds=2,
        min_devices=2,
        training=TrainingConfig(
            batch_size=8, lr=0.1, codec="float32", gate=GateSettings(threshold=0), eval_fraction=0
        ),
    )
    try:
        a, b = agent(broker, "a", 1, quiet=True), agent(broker, "b", 2, quiet=True)
        for _ in range(10_000):  # until round 2 is announced into both inboxes
            while (msg := agg.link.get(0)) is not None:
                agg.handle(msg)
            agg.tick()
            if agg.current is not None and agg.current.round_id == 2:
                break
            for device in (a, b):
                while device.step(0):
                    pass
        assert agg.current is not None and agg.current.round_id == 2
        # a's process dies before it reads its inbox; what the broker handed it is gone.
        a.link.close()
        again = agent(broker, "a", 1, quiet=True)  # a new process: a status "online"
        records = serve(agg, [again, b], 2)
        assert records[1]["participants"] == ["a", "b"] and records[1]["missing"] == []
        assert records[1]["bytes_down_by_device"]["a"] > records[1]["bytes_down_by_device"]["b"]
    finally:
        agg.store.close()

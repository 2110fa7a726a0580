"""An agent that pins the aggregator's key obeys only signed, current rounds and models."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fedge.agent.daemon import Agent
from fedge.agent.dataset import Dataset
from fedge.agent.outbox import Outbox, Pending
from fedge.agent.residual import ResidualStore
from fedge.agent.state import AgentState, load_state, save_state
from fedge.models.runtime import load_runtime
from fedge.protocol import (
    GateSettings,
    GlobalModelHeader,
    MemoryBroker,
    MemoryLink,
    RoundAnnouncement,
    Topics,
    TrainingConfig,
    UpdateHeader,
    decode,
    encode,
    sign,
)
from fedge.protocol.signing import key_id, verify_key
from helpers import DIGITS_MODEL

pytestmark = pytest.mark.link
FLEET = "trust"
T = Topics(FLEET)
KEY = Ed25519PrivateKey.generate()
NEXT_KEY = Ed25519PrivateKey.generate()
ATTACKER = Ed25519PrivateKey.generate()
WEIGHTS = load_runtime(DIGITS_MODEL).get_weights()


def global_payload(version: int, weights: dict, key: Ed25519PrivateKey | None, fleet: str = FLEET):
    envelope = encode(
        GlobalModelHeader(fleet=fleet, model_version=version, round_id=version), weights
    )
    return envelope if key is None else sign(envelope, key, fleet=fleet, kind="global")


def round_payload(round_id: int, version: int, key: Ed25519PrivateKey | None, epochs: int = 1):
    ann = RoundAnnouncement(
        fleet=FLEET,
        round_id=round_id,
        model_version=version,
        deadline=2e9,
        selected=("d1",),
        config=TrainingConfig(
            epochs=epochs, batch_size=8, lr=0.1, codec="float32", gate=GateSettings(threshold=0)
        ),
    )
    return encode(ann) if key is None else sign(encode(ann), key, fleet=FLEET, kind="round")


class Fleet:
    def __init__(self, tmp_path: Path, keys=(KEY,), *, outbox: bool = False) -> None:
        self.broker = MemoryBroker()
        self.server = MemoryLink(self.broker, "server")
        self.server.connect()
        self.server.subscribe(T.updates)
        self.state_file = tmp_path / "state.json"
        self.keys = keys
        # With an outbox, and a residual beside it, as the service has them.
        self.outbox = Outbox(tmp_path / "outbox") if outbox else None
        self.residual = ResidualStore(tmp_path / "residual.npz") if outbox else None
        self.agent = self.start_agent()

    def start_agent(self) -> Agent:
        rng = np.random.default_rng(0)
        pending = None if self.outbox is None else Outbox(self.outbox.path).take()
        agent = Agent(
            device_id="d1",
            fleet=FLEET,
            link=MemoryLink(self.broker, "d1"),
            runtime=load_runtime(DIGITS_MODEL, prefer=("numpy",)),
            data=Dataset(
                rng.random((40, 64), np.float32), rng.integers(0, 10, 40).astype(np.int32)
            ),
            state=load_state(self.state_file, answered=pending and pending.state),
            save_state=lambda s: save_state(self.state_file, s),
            trusted_keys=[verify_key(k) for k in self.keys],
            outbox=None if self.outbox is None else Outbox(self.outbox.path),
            residual_store=self.residual,
        )
        agent.start()
        return agent

    def publish(self, topic: str, payload: bytes) -> None:
        self.server.publish(topic, payload, retain=True)
        while self.agent.step(0):
            pass

    def updates(self) -> list[UpdateHeader]:
        out = []
        while (msg := self.server.get(0)) is not None:
            out.append(decode(msg.payload).msg)
        return [u for u in out if isinstance(u, UpdateHeader)]


def test_forged_unsigned_other_fleet_and_replayed_messages_are_refused(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    agent = fleet.agent
    fleet.publish(T.global_model, global_payload(1, WEIGHTS, KEY))
    assert agent.global_version == 1
    zeros = {k: np.zeros_like(v) for k, v in WEIGHTS.items()}
    fleet.publish(T.global_model, global_payload(2, zeros, None))  # unsigned
    fleet.publish(T.global_model, global_payload(3, zeros, ATTACKER))  # not a pinned key
    forged = bytearray(global_payload(4, WEIGHTS, KEY))
    forged[-1] ^= 1  # one bit of a weight changed after signing
    fleet.publish(T.global_model, bytes(forged))
    # Another fleet's signed model, published here: its signature is bound to its fleet.
    fleet.publish(T.global_model, global_payload(5, zeros, KEY, fleet="elsewhere"))
    # Signed for this fleet's topic but naming another fleet inside.
    inner = encode(GlobalModelHeader(fleet="elsewhere", model_version=6, round_id=6), zeros)
    fleet.publish(T.global_model, sign(inner, KEY, fleet=FLEET, kind="global"))
    assert agent.global_version == 1
    assert np.array_equal(agent.global_weights["dense0_kernel"], WEIGHTS["dense0_kernel"])
    # The highest possible round id, forged: before signatures every agent obeyed it for ever.
    fleet.publish(T.round, round_payload(4294967295, 1, ATTACKER, epochs=20))
    fleet.publish(T.round, round_payload(7, 1, None))
    assert fleet.updates() == [] and load_state(fleet.state_file).last_round == 0
    fleet.publish(T.round, round_payload(1, 1, KEY))  # the real round is answered
    [update] = fleet.updates()
    assert update.round_id == 1
    fleet.publish(T.global_model, global_payload(2, WEIGHTS, KEY))
    fleet.publish(T.global_model, global_payload(1, WEIGHTS, KEY))  # an old signed model, replayed
    fleet.publish(T.round, round_payload(2, 2, KEY))
    fleet.publish(T.round, round_payload(1, 1, KEY))  # an old signed round, replayed
    assert [u.round_id for u in fleet.updates()] == [2]
    assert agent.global_version == 2
    assert dict(agent.stats.rejected) == {
        "unsigned": 2,
        "unknown_key": 2,
        "bad_signature": 2,  # the altered model and the other fleet's
        "other_fleet": 1,
        "old_version": 1,
        "old_round": 1,
    }


def test_replays_are_refused_across_a_restart(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    fleet.publish(T.global_model, global_payload(3, WEIGHTS, KEY))
    fleet.publish(T.round, round_payload(5, 3, KEY))
    assert [u.round_id for u in fleet.updates()] == [5]
    fleet.agent.link.close()
    fleet.agent = fleet.start_agent()  # state from the file; the retained copies come again
    fleet.publish(T.global_model, global_payload(2, WEIGHTS, KEY))
    fleet.publish(T.round, round_payload(4, 2, KEY))
    assert fleet.agent.stats.rejected == {"old_version": 1, "old_round": 1}
    assert fleet.updates() == []


def test_a_rotated_key_is_accepted_beside_the_old_one(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, keys=(KEY, NEXT_KEY))
    fleet.publish(T.global_model, global_payload(1, WEIGHTS, KEY))
    fleet.publish(T.global_model, global_payload(2, WEIGHTS, NEXT_KEY))
    assert fleet.agent.global_version == 2 and not fleet.agent.stats.rejected


def test_a_state_poisoned_before_signing_is_forgotten_when_a_key_is_first_pinned(
    tmp_path: Path,
) -> None:
    from fedge.agent.state import AgentState

    # Before signatures a forged round 2^32-1 was obeyed and saved: every real round ignored.
    save_state(tmp_path / "state.json", AgentState(last_round=2**32 - 1, model_version=7))
    fleet = Fleet(tmp_path)
    fleet.publish(T.global_model, global_payload(1, WEIGHTS, KEY))
    fleet.publish(T.round, round_payload(1, 1, KEY))
    assert [u.round_id for u in fleet.updates()] == [1]
    assert load_state(fleet.state_file).trusted_keys is not None


def test_rotation_keeps_what_was_seen_but_a_new_trust_root_does_not(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    fleet.publish(T.global_model, global_payload(3, WEIGHTS, KEY))
    fleet.publish(T.round, round_payload(5, 3, KEY))
    fleet.agent.link.close()
    fleet.keys = (KEY, NEXT_KEY)  # rotation: the old key is still pinned
    fleet.agent = fleet.start_agent()
    assert fleet.agent.state.round_seen == 5 and fleet.agent.state.model_version == 3
    fleet.agent.link.close()
    fleet.keys = (ATTACKER,)  # a new trust root: nothing seen under the old keys binds
    fleet.agent = fleet.start_agent()
    assert fleet.agent.state.round_seen == 0 and fleet.agent.state.model_version == -1


@pytest.mark.parametrize("case", ["answered", "saved_first", "no_state"])
def test_an_answer_kept_from_before_a_new_trust_root_is_dropped(tmp_path: Path, case: str) -> None:
    """Before a key was pinned a forged round 10^9 was answered, and its answer is still in
    the outbox with the state it leaves. Pinning the key forgets the round, and the outbox
    must not bring it back when it is sent again (every real round would be refused): it is
    dropped, its residual kept. ``saved_first``: the state under the new key was saved and
    the outbox is still there (a crash between, or a disk that refused the drop);
    ``no_state``: an outbox of an earlier version, without the state."""
    forged = AgentState(last_round=10**9, round_seen=10**9, model_version=3)
    kept = {k: np.full_like(v, 0.01) for k, v in WEIGHTS.items()}
    update = Pending(10**9, "ab" * 8, T.update("d1"), [b"the forged round's update"], kept)
    Outbox(tmp_path / "outbox").put(update if case == "no_state" else replace(update, state=forged))
    pinned = [key_id(verify_key(KEY)).hex()]
    before = AgentState(trusted_keys=pinned) if case == "saved_first" else forged
    save_state(tmp_path / "state.json", before)
    fleet = Fleet(tmp_path, outbox=True)
    assert fleet.agent.state.last_round == 0 and load_state(fleet.state_file).last_round == 0
    assert fleet.server.get(0) is None  # not sent again
    assert Outbox(tmp_path / "outbox").take() is None
    residual = ResidualStore(tmp_path / "residual.npz").load(WEIGHTS)
    assert residual is not None and all(np.array_equal(residual[k], kept[k]) for k in kept)
    fleet.publish(T.global_model, global_payload(1, WEIGHTS, KEY))
    fleet.publish(T.round, round_payload(1, 1, KEY))  # the real round is answered
    assert [u.round_id for u in fleet.updates()] == [1]
    assert load_state(fleet.state_file).trusted_keys == pinned

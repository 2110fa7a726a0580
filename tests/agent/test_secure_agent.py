"""An agent in a secure round (docs/secure-aggregation.md): it advertises when the round
selects it, answers each of the aggregator's signed stage messages, sends its masked
update in the usual envelope, keeps what the quantisation left out as its residual, and
refuses stage messages that are unsigned or meant for another device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fedge.agent.daemon import Agent
from fedge.agent.dataset import Dataset
from fedge.agent.residual import ResidualStore
from fedge.models.runtime import load_runtime
from fedge.protocol import (
    GateSettings,
    GlobalModelHeader,
    MemoryBroker,
    MemoryLink,
    RoundAnnouncement,
    SecureSettings,
    Topics,
    TrainingConfig,
    UpdateHeader,
    decode,
    encode,
    parse_codec,
    sign,
)
from fedge.protocol.secagg import (
    SecAggClient,
    SecAggParams,
    SecAggServer,
    address,
    dequantize_sum,
    from_ring,
    quantize,
    secure_round,
    to_ring,
    wire,
)
from fedge.protocol.signing import verify_key
from helpers import DIGITS_MODEL

pytestmark = pytest.mark.link
FLEET = "sec"
T = Topics(FLEET)
KEY = Ed25519PrivateKey.generate()
WEIGHTS = load_runtime(DIGITS_MODEL).get_weights()
SETTINGS = SecureSettings(seed="ab" * 32, clip=0.05, bits=8)
CONFIG = TrainingConfig(
    epochs=1,
    batch_size=8,
    lr=0.1,
    codec="float32",
    gate=GateSettings(threshold=0),
    eval_fraction=0,
    secure=SETTINGS,
)
DEVICES = ("d1", "d2", "d3")


def signed(kind: str, envelope: bytes) -> bytes:
    return sign(envelope, KEY, fleet=FLEET, kind=kind)


def start(tmp_path: Path, *, quiet: bool = False) -> tuple[Agent, MemoryLink]:
    """d1 with the model and round 1 (secure, d1-d3): on the broadcast topics, or in its
    inbox when it is quiet."""
    broker = MemoryBroker()
    server = MemoryLink(broker, "server")
    server.connect()
    server.subscribe(T.updates)
    rng = np.random.default_rng(0)
    agent = Agent(
        device_id="d1",
        fleet=FLEET,
        link=MemoryLink(broker, "d1"),
        runtime=load_runtime(DIGITS_MODEL, prefer=("numpy",)),
        data=Dataset(rng.random((40, 64), np.float32), rng.integers(0, 10, 40).astype(np.int32)),
        rng=np.random.default_rng(1),
        residual_store=ResidualStore(tmp_path / "residual.npz"),
        trusted_keys=[verify_key(KEY)],
        quiet=quiet,
    )
    agent.start()
    header = GlobalModelHeader(fleet=FLEET, model_version=1, round_id=0)
    model = signed("global", encode(header, WEIGHTS))
    ann = RoundAnnouncement(
        fleet=FLEET, round_id=1, model_version=1, deadline=2e9, selected=DEVICES, config=CONFIG
    )
    announcement = signed("round", encode(ann))
    if quiet:
        server.publish(T.inbox("d1"), model)
        server.publish(T.inbox("d1"), announcement)
    else:
        server.publish(T.global_model, model, retain=True)
        server.publish(T.round, announcement, retain=True)
    while agent.step(0):
        pass
    return agent, server


@pytest.fixture
def agent(tmp_path: Path) -> tuple[Agent, MemoryLink]:
    return start(tmp_path)


def drain(agent: Agent, server: MemoryLink) -> list[bytes]:
    while agent.step(0):
        pass
    out = []
    while (msg := server.get(0)) is not None:
        if msg.topic == T.update("d1"):
            out.append(msg.payload)
    return out


def play(
    device: Agent, server: MemoryLink, *, copies: int = 1
) -> tuple[SecAggParams, np.ndarray, dict, np.ndarray]:
    """Play round 1 to its end with d1 and two simulated devices: (the round's parameters,
    the sum, the other devices' quantised inputs, d1's residual flattened). ``copies``: how
    many times the broker delivers each of the aggregator's messages (QoS 1 is at least once)."""

    def send(topic: str, message: bytes) -> None:
        for _ in range(copies):
            server.publish(topic, message)

    shapes = {k: v.shape for k, v in WEIGHTS.items()}
    plan = secure_round(FLEET, 1, DEVICES, SETTINGS, shapes, parse_codec("float32"))
    p = plan.params
    [advertise] = drain(device, server)  # on the announcement, before training
    aggregator = SecAggServer(p)
    aggregator.add_advertise("d1", advertise)
    others = {d: SecAggClient(p, d) for d in DEVICES[1:]}
    for d, c in others.items():
        aggregator.add_advertise(d, c.advertise())
    keys = aggregator.close_advertise()
    send(T.secagg("d1"), signed("secagg", address("d1", keys["d1"])))
    [shares] = drain(device, server)
    aggregator.add_shares("d1", shares)
    for d, c in others.items():
        aggregator.add_shares(d, c.share_keys(keys[d]))
    forward = aggregator.close_shares()
    send(T.secagg("d1"), signed("secagg", address("d1", forward["d1"])))
    [update] = drain(device, server)
    decoded = decode(update)
    assert isinstance(decoded.msg, UpdateHeader) and decoded.msg.codec == "secagg"
    aggregator.add_masked("d1", decoded.tensors["masked"].tobytes())
    rng = np.random.default_rng(2)
    qs = {d: quantize(np.full(p.length, 0.01), p.clip, p.bits, rng) for d in others}
    for d, c in others.items():
        c.receive_shares(forward[d])
        aggregator.add_masked(d, c.masked_input(to_ring(qs[d], p.k)))
    survivors = aggregator.close_masked()
    send(T.secagg_all, signed("secagg", address("", survivors)))
    [unmask] = drain(device, server)
    aggregator.add_unmask("d1", unmask)
    for d, c in others.items():
        aggregator.add_unmask(d, c.unmask(survivors))
    return p, aggregator.finish(), qs, plan.flatten(device.residual)


@pytest.mark.parametrize("copies", [1, 2])
def test_the_agent_takes_its_part_and_the_sum_holds_its_update(
    agent: tuple[Agent, MemoryLink], copies: int
) -> None:
    """Also when the broker delivers every stage message twice (a PUBACK lost with the
    link): each copy is ignored, answered once, and the device stays in the round."""
    device, server = agent
    p, total, qs, residual = play(device, server, copies=copies)
    # What the sum holds of d1 is what d1 sent: its update less the residual it kept.
    mine = from_ring(total, p.k) - sum(qs.values())
    sent = dequantize_sum(to_ring(mine, p.k), p.k, count=1, max_devices=3, clip=p.clip, bits=p.bits)
    assert np.abs(mine).max() > 0 and np.abs(residual).max() > 0
    step = p.clip / ((1 << (p.bits - 1)) - 1)
    within_range = np.abs(sent + residual) <= p.clip  # (beyond the clip, the residual keeps it)
    assert np.all(np.abs(residual[within_range]) < step + 1e-6)
    assert device.secure is None and device.state.last_round == 1
    assert device.stats.rounds_trained == 1 and device.outcome == ("sent", None)
    # The keys and the shares again while the turn is open; the survivors once it is over.
    assert device.stats.rejected["secagg_duplicate"] == 2 * (copies - 1)
    assert device.stats.rejected["secagg_wrong_round"] == copies - 1
    assert device.stats.rejected["secagg_wrong_stage"] == 0


@pytest.mark.parametrize("quiet", [False, True])
def test_once_its_secure_round_is_over_a_quiet_device_hears_no_stage_messages(
    tmp_path: Path, quiet: bool
) -> None:
    """A quiet device takes its part in a secure round as any other (its round came in its
    inbox); once the round is over it leaves the secagg topics, so the survivor lists of
    rounds it is not in do not wake it. A device listening to every round keeps them."""
    device, server = start(tmp_path, quiet=quiet)
    play(device, server)
    assert device.secure is None and device.outcome == ("sent", None)
    for _ in range(3):  # later secure rounds without d1
        server.publish(T.secagg_all, signed("secagg", address("", b"survivors")))
    drain(device, server)
    heard = device.stats.rejected["secagg_wrong_round"]
    assert heard == (0 if quiet else 3)


def test_unsigned_and_misaddressed_stage_messages_are_refused(
    agent: tuple[Agent, MemoryLink],
) -> None:
    device, server = agent
    drain(device, server)
    turn = device.secure
    assert turn is not None
    server.publish(T.secagg("d1"), address("d1", b"FSA\x01\x02" + bytes(8)))  # unsigned
    server.publish(T.secagg("d2"), signed("secagg", address("d2", b"FSA")))  # not its topic
    server.publish(T.secagg_all, signed("secagg", address("d2", b"FSA\x01\x02" + bytes(8))))
    drain(device, server)
    assert device.stats.rejected["unsigned"] == 1
    assert device.stats.rejected["secagg_unknown_device"] == 1
    assert device.secure is None  # a message it cannot trust ends its part: a dropout


@pytest.mark.parametrize("late", ["other_keys", "survivors_first"])
def test_a_stage_message_out_of_order_still_ends_the_turn(
    agent: tuple[Agent, MemoryLink], late: str
) -> None:
    """Only a copy of the message answered is a redelivery: another key list after the
    keys were shared, or the survivors before the shares, ends the device's part."""
    device, server = agent
    shapes = {k: v.shape for k, v in WEIGHTS.items()}
    p = secure_round(FLEET, 1, DEVICES, SETTINGS, shapes, parse_codec("float32")).params
    [advertise] = drain(device, server)

    def key_list() -> bytes:
        aggregator = SecAggServer(p)
        aggregator.add_advertise("d1", advertise)
        for d in DEVICES[1:]:
            aggregator.add_advertise(d, SecAggClient(p, d).advertise())
        return aggregator.close_advertise()["d1"]

    server.publish(T.secagg("d1"), signed("secagg", address("d1", key_list())))
    [_shares] = drain(device, server)
    assert device.secure is not None and device.secure.prepared is not None  # trained
    if late == "other_keys":  # the neighbours' keys changed: not the message answered
        message = address("d1", key_list())
    else:
        message = address("", wire.header(wire.Kind.SURVIVORS, 1) + wire.bitmap([True] * 3))
    server.publish(
        T.secagg_all if late == "survivors_first" else T.secagg("d1"), signed("secagg", message)
    )
    assert drain(device, server) == []
    assert device.secure is None  # a dropout: the masked update is never sent
    assert device.stats.rejected["secagg_wrong_stage"] == 1
    assert device.stats.rejected["secagg_duplicate"] == 0

"""Fault injection pieces: option parsing, seeded draws, the faulty link and the relay."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
from fedge.fleet.faults import FaultSpecError, Ledger, fault_settings, plan
from fedge.fleet.faults.link import FaultyLink
from fedge.fleet.faults.proxy import LinkProxy
from fedge.protocol import (
    MemoryBroker,
    MemoryLink,
    RoundAnnouncement,
    Topics,
    TrainingConfig,
    UpdateHeader,
    decode,
    decode_delta,
    encode,
    encode_delta,
    parse_codec,
)

pytestmark = pytest.mark.unit

DEVICES = [f"dev{i:03d}" for i in range(10)]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"drop_rate": 1.5}, "--drop-rate must be between 0 and 1"),
        ({"link_flaps": -0.1}, "--link-flaps must be between 0 and 1"),
        ({"stragglers": "weibull:1"}, "want lognormal:MEAN_S:SIGMA or exp:MEAN_S"),
        ({"stragglers": "exp:0"}, "the mean must be above 0"),
        ({"stragglers": "lognormal:2:x"}, "sigma must be a number"),
        ({"poison": "11:sign-flip"}, "K must be between 1 and 10"),
        ({"poison": "2:scale:1"}, "must differ from 0 and 1"),
        ({"poison": "2:flip"}, "want K:sign-flip or K:scale:F"),
        ({"broker_restarts": -1}, "--broker-restarts must be 0 or more"),
        ({"hung": 11}, "--hung must be between 0 and 10 devices"),
    ],
)
def test_bad_fault_options_are_one_line(options: dict, message: str) -> None:
    with pytest.raises(FaultSpecError, match=message) as info:
        fault_settings(devices=10, **options)
    assert "\n" not in str(info.value)


def test_fault_options_parse() -> None:
    s = fault_settings(
        drop_rate=0.3, stragglers="lognormal:2:0.5", poison="2:scale:10", devices=10, seed=4
    )
    assert s.active and str(s.stragglers) == "lognormal:2:0.5" and str(s.poison) == "2:scale:10"
    assert s.poison is not None and s.poison.factor == 10.0
    flip = fault_settings(poison="1:sign-flip", devices=3).poison
    assert flip is not None and flip.factor == -1.0 and str(flip) == "1:sign-flip"
    assert not fault_settings(devices=3).active


def test_latency_means_and_a_constant() -> None:
    rng = np.random.default_rng(0)
    for spec, mean in (("lognormal:2:1", 2.0), ("exp:0.5", 0.5)):
        latency = fault_settings(stragglers=spec, devices=1).stragglers
        assert latency is not None
        draws = [latency.sample(rng) for _ in range(20000)]
        assert abs(np.mean(draws) - mean) < 0.05 * mean
    constant = fault_settings(stragglers="lognormal:1.5:0", devices=1).stragglers
    assert constant is not None and constant.sample(rng) == 1.5


def test_draws_depend_on_seed_device_and_round_only() -> None:
    s = fault_settings(drop_rate=0.3, stragglers="exp:1", link_flaps=0.2, devices=10, seed=3)
    grid = [(d, r) for d in range(10) for r in range(1, 401)]
    drops = [plan.dropped(s, d, r) for d, r in grid]
    assert drops == [plan.dropped(s, d, r) for d, r in reversed(grid)][::-1]  # any order
    assert 0.27 < np.mean(drops) < 0.33
    assert [plan.training_delay(s, 1, r) for r in (5, 6)] == [
        plan.training_delay(s, 1, r) for r in (5, 6)
    ]
    flaps = [plan.flap_after(s, d, r, 10) for d, r in grid]
    assert 0.17 < np.mean([f is not None for f in flaps]) < 0.23
    assert {f for f in flaps if f is not None} == set(range(10))
    other = fault_settings(drop_rate=0.3, devices=10, seed=4)
    assert drops != [plan.dropped(other, d, r) for d, r in grid]


def test_restart_plan_and_poisoned_devices_are_seeded() -> None:
    s = fault_settings(broker_restarts=3, poison="2:sign-flip", devices=10, seed=1)
    restarts = plan.restart_plan(s, rounds=20, answers=10)
    assert sum(len(v) for v in restarts.values()) == 3 and len(restarts) == 3  # distinct rounds
    assert all(1 <= r <= 20 and all(0 <= a < 10 for a in v) for r, v in restarts.items())
    assert restarts == plan.restart_plan(s, rounds=20, answers=10)
    many = plan.restart_plan(fault_settings(broker_restarts=5, devices=2), rounds=2, answers=2)
    assert sum(len(v) for v in many.values()) == 5
    chosen = plan.poisoned_devices(s, DEVICES)
    assert len(chosen) == 2 and chosen == plan.poisoned_devices(s, DEVICES)


def _update(device: str, round_id: int, rng: np.random.Generator) -> tuple[bytes, dict]:
    delta = {"w": rng.normal(size=(20, 10)).astype(np.float32), "b": np.ones(10, np.float32)}
    codec = "topk:0.3+int8"
    encoded = encode_delta(delta, parse_codec(codec), rng)
    header = UpdateHeader(
        device_id=device,
        round_id=round_id,
        update_id="00112233aabbccdd",
        base_version=0,
        num_samples=50,
        codec=codec,
    )
    return encode(header, encoded.tensors), encoded.decoded


def _faulty(broker: MemoryBroker, ledger: Ledger, **kwargs: object) -> FaultyLink:
    link = FaultyLink(
        MemoryLink(broker, "dev000"),
        device_id="dev000",
        index=0,
        fleet="f",
        ledger=ledger,
        round_timeout=10.0,
        stop=threading.Event(),
        **kwargs,  # type: ignore[arg-type]
    )
    link.shapes = {"w": [20, 10], "b": [10]}
    link.connect()
    return link


@pytest.mark.parametrize(("mode", "factor"), [("sign-flip", -1.0), ("scale:10", 10.0)])
def test_a_poisoned_device_sends_its_honest_delta_times_the_factor(
    mode: str, factor: float
) -> None:
    broker = MemoryBroker()
    settings = fault_settings(poison=f"1:{mode}", devices=1)
    ledger = Ledger(settings, ["dev000"])
    link = _faulty(broker, ledger, settings=settings, poisoned=True)
    server = MemoryLink(broker, "server")
    server.connect()
    server.subscribe(Topics("f").updates)
    payload, honest = _update("dev000", 3, np.random.default_rng(0))
    link.publish(Topics("f").update("dev000"), payload)
    got = decode(server.get(1.0).payload)  # type: ignore[union-attr]
    sent = decode_delta(got.tensors, {"codec": "topk:0.3+int8", "shapes": link.shapes})
    for name, value in honest.items():
        np.testing.assert_allclose(sent[name], factor * value, rtol=1e-5, atol=1e-6)
    assert got.msg == decode(payload).msg  # same header: same update id, round, samples
    summary = ledger.summary([{"round": 3, "status": "done", "participants": ["dev000"]}])
    assert summary["poisoned_sent"] == 1 and summary["poisoned_accepted"] == 1


def test_dropped_and_late_answers_never_arrive() -> None:
    broker = MemoryBroker()
    topics = Topics("f")
    settings = fault_settings(drop_rate=0.3, stragglers="exp:6", devices=1, seed=1)
    ledger = Ledger(settings)
    link = _faulty(broker, ledger, settings=settings)  # round_timeout 10 s
    link.subscribe(topics.round)
    server = MemoryLink(broker, "server")
    server.connect()
    server.subscribe(topics.updates)
    arrived = set()
    rng = np.random.default_rng(0)
    rounds = range(1, 13)
    for round_id in rounds:
        # Announced 11 s ago: an answer due within the 10 s timeout goes now, a later one is
        # already past its deadline. Neither waits.
        ann = RoundAnnouncement(
            fleet="f",
            round_id=round_id,
            model_version=0,
            deadline=time.time() - 1.0,
            selected=("dev000",),
            config=TrainingConfig(),
        )
        server.publish(topics.round, encode(ann))
        assert link.get(1.0) is not None
        link.publish(topics.update("dev000"), _update("dev000", round_id, rng)[0])
        if server.get(0.05) is not None:
            arrived.add(round_id)
    summary = ledger.summary([])
    dropped = {int(r) for r in summary["dropped_by_round"]}
    late = {int(r) for r in summary["late_by_round"]}
    assert dropped == {r for r in rounds if plan.dropped(settings, 0, r)} and dropped
    delays = {r: plan.training_delay(settings, 0, r) or 0.0 for r in rounds}
    assert late == {r for r in rounds if r not in dropped and delays[r] > 10.0} and late
    assert arrived == set(rounds) - dropped - late
    assert summary["dropped"] == len(dropped) and summary["stragglers_late"] == len(late)


def test_a_hung_device_is_online_and_never_answers() -> None:
    broker = MemoryBroker()
    topics = Topics("f")
    settings = fault_settings(hung=1, devices=10, seed=2)
    assert settings.active and plan.hung_devices(settings, DEVICES) == plan.hung_devices(
        settings, DEVICES
    )
    assert len(plan.hung_devices(settings, DEVICES)) == 1
    ledger = Ledger(settings, hung_devices=["dev000"])
    link = _faulty(broker, ledger, settings=settings, hung=True)
    server = MemoryLink(broker, "server")
    server.connect()
    server.subscribe(topics.updates)
    server.subscribe(topics.statuses)
    link.publish(topics.status("dev000"), b"online")
    for round_id in (1, 2):
        link.publish(
            topics.update("dev000"), _update("dev000", round_id, np.random.default_rng(0))[0]
        )
    got = server.get(0.05)
    assert got is not None and got.topic == topics.status("dev000")  # its status goes through
    assert server.get(0.05) is None  # its answers never do
    summary = ledger.summary([])
    assert summary["hung_devices"] == ["dev000"] and summary["hung_unanswered"] == 2


def test_the_relay_cuts_a_device_connection_and_takes_the_next() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        host, port = server.getsockname()
        with LinkProxy(host, port, ["dev000", "dev001"]) as proxy:
            assert not proxy.cut("dev000")  # nothing to cut yet
            client = socket.create_connection(("127.0.0.1", proxy.port_of("dev000")), timeout=2)
            upstream, _ = server.accept()
            client.sendall(b"ping")
            assert upstream.recv(4) == b"ping"
            assert proxy.cut("dev000")
            assert client.recv(4) == b"" and upstream.recv(4) == b""  # both ends see it end
            client.close()
            upstream.close()
            again = socket.create_connection(("127.0.0.1", proxy.port_of("dev000")), timeout=2)
            upstream, _ = server.accept()
            upstream.sendall(b"pong")
            assert again.recv(4) == b"pong"
            again.close()
            upstream.close()

"""Crashes in the field over a real Mosquitto: an aggregator killed mid-round resumes with
what it accepted, and a fleet whose retained global model went stale heals. Each time the
global model equals the sample-weighted average of exactly the updates that were accepted."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fedge.agent.config import AgentConfig
from fedge.agent.daemon import Agent
from fedge.agent.service import build_agent
from fedge.aggregator.config import AggregatorConfig
from fedge.aggregator.coordinator import Aggregator
from fedge.aggregator.service import build_aggregator
from fedge.aggregator.strategies.config import StrategyConfig
from fedge.protocol import (
    GateSettings,
    GlobalModelHeader,
    Topics,
    TrainingConfig,
    UpdateHeader,
    decode,
    make_link,
)
from helpers import DIGITS_MODEL, digits_partitions

pytestmark = [pytest.mark.broker, pytest.mark.slow]


class Loop:
    """Runs an agent's or the aggregator's loop in a thread until stopped."""

    def __init__(self, target: Agent | Aggregator) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=target.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def halt(self) -> None:
        self.stop.set()
        self.thread.join(15)


class Observer:
    """Records every update and global model published in the fleet."""

    def __init__(self, url: str, fleet: str) -> None:
        self.topics = Topics(fleet)
        self.link = make_link(url, f"obs-{fleet[-12:]}")
        self.link.connect(timeout=5)
        self.link.subscribe(self.topics.updates)
        self.link.subscribe(self.topics.global_model)
        self.updates: dict[int, dict[str, tuple[int, dict[str, np.ndarray]]]] = {}
        self.globals: dict[int, dict[str, np.ndarray]] = {}
        self.raw_globals: dict[int, bytes] = {}
        self.sends: Counter[tuple[int, str]] = Counter()  # (round, device) -> updates seen

    def drain(self, seconds: float = 0.2) -> None:
        while (msg := self.link.get(seconds)) is not None:
            if not msg.payload:
                continue
            d = decode(msg.payload)
            if isinstance(d.msg, UpdateHeader):
                self.sends[(d.msg.round_id, d.msg.device_id)] += 1
                self.updates.setdefault(d.msg.round_id, {})[d.msg.device_id] = (
                    d.msg.num_samples,
                    d.tensors,
                )
            elif isinstance(d.msg, GlobalModelHeader):
                self.globals[d.msg.model_version] = d.tensors
                self.raw_globals.setdefault(d.msg.model_version, msg.payload)

    def wait_for(self, what, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not what():
            assert time.monotonic() < deadline, "timed out"
            self.drain()

    def assert_exact_average(self, round_id: int, version: int, accepted: list[str]) -> None:
        prev, new = self.globals[version - 1], self.globals[version]
        sent = self.updates[round_id]
        total = sum(sent[d][0] for d in accepted)
        for name in prev:
            expected = prev[name].astype(np.float64) + sum(
                sent[d][1][name].astype(np.float64) * sent[d][0] / total for d in accepted
            )
            np.testing.assert_allclose(new[name], expected.astype(np.float32), rtol=0, atol=1e-6)


def configs(tmp_path: Path, url: str, fleet: str, devices: int, **agg: object):  # type: ignore[no-untyped-def]
    parts, test = digits_partitions(tmp_path, devices, seed=5)
    agg_cfg = AggregatorConfig(
        fleet=fleet,
        broker=url,
        client_id=f"agg-{fleet[-12:]}",
        model=DIGITS_MODEL,
        state_dir=tmp_path / "agg",
        min_devices=devices,
        quorum=1.0,
        round_timeout=60,
        training=TrainingConfig(
            epochs=1, batch_size=16, lr=0.1, codec="float32", gate=GateSettings(threshold=0)
        ),
        strategy=StrategyConfig(name="fedavg"),
        eval_data=test,
        **agg,  # type: ignore[arg-type]
    )
    agents = [
        AgentConfig(
            device_id=f"d{i}-{fleet[-8:]}",
            fleet=fleet,
            broker=url,
            model=DIGITS_MODEL,
            data=p,
            state_dir=tmp_path / "agents",
            seed=i,
        )
        for i, p in enumerate(parts)
    ]
    return agg_cfg, agents


def start(tmp_path: Path, url: str, fleet: str, devices: int, rounds: int):  # type: ignore[no-untyped-def]
    """An aggregator and its devices, started (loops not yet running), and an observer."""
    agg_cfg, agent_cfgs = configs(tmp_path, url, fleet, devices, rounds=rounds)
    observer = Observer(url, fleet)
    agg = build_aggregator(agg_cfg)
    agents = [build_agent(c) for c in agent_cfgs]
    agg.start()
    for a in agents:
        a.start()
    return agg_cfg, agent_cfgs, observer, agg, agents


def stop(loops: list[Loop], agents: list[Agent], agg: Aggregator, observer: Observer) -> None:
    for loop in loops:
        loop.halt()
    for a in agents:
        a.stop()
    agg.link.close()
    agg.store.close()
    observer.drain(0.5)
    observer.link.close()


def test_an_aggregator_killed_mid_round_resumes_with_what_it_had_accepted(
    tmp_path: Path,
    mosquitto,
    fleet_id: str,  # type: ignore[no-untyped-def]
) -> None:
    agg_cfg, agent_cfgs, observer, agg, agents = start(tmp_path, mosquitto.url, fleet_id, 3, 1)
    loops = [Loop(agg), Loop(agents[0]), Loop(agents[1])]  # the third is slow to answer
    rnd = lambda: agg.current  # noqa: E731
    observer.wait_for(lambda: rnd() is not None and len(rnd().uploaded) == 2)  # type: ignore[union-attr]
    loops[0].halt()  # the aggregator dies: no clean shutdown, its database left as it is
    agg.link.close()
    agg.store.db.close()
    again = build_aggregator(agg_cfg)
    assert again.current is not None and len(again.current.uploaded) == 2
    again.start()
    loops[0] = Loop(again)
    loops.append(Loop(agents[2]))
    observer.wait_for(lambda: again.done and 1 in observer.globals)
    stop(loops, agents, again, observer)
    accepted = sorted(c.device_id for c in agent_cfgs)
    assert sorted(observer.updates[1]) == accepted
    assert all(observer.sends[(1, d)] == 1 for d in accepted), observer.sends  # once each
    observer.assert_exact_average(round_id=1, version=1, accepted=accepted)


def test_a_fleet_whose_retained_global_went_stale_heals(
    tmp_path: Path,
    mosquitto,
    fleet_id: str,  # type: ignore[no-untyped-def]
) -> None:
    _, agent_cfgs, observer, agg, agents = start(tmp_path, mosquitto.url, fleet_id, 2, 2)
    agg_loop = Loop(agg)
    deadline = time.monotonic() + 60
    while any(a.global_version < 1 for a in agents):  # round 1 and its model, no further
        assert time.monotonic() < deadline, "round 1 did not complete"
        for a in agents:
            if a.global_version < 1:
                a.step(0.1)
    observer.wait_for(lambda: 1 in observer.globals and agg.current is not None)
    # A site reboot right after round 2 was announced: the agents go down, and the broker
    # comes back with the stale v0 as its retained global model.
    for a in agents:
        a.link.close()
    stale = make_link(mosquitto.url, f"stale-{fleet_id[-12:]}")
    stale.connect(timeout=5)
    stale.publish(Topics(fleet_id).global_model, observer.raw_globals[0], retain=True)
    stale.close()
    agents = [build_agent(c) for c in agent_cfgs]  # restarted, with their state files
    for a in agents:
        a.start()
    loops = [Loop(a) for a in agents]
    observer.wait_for(lambda: agg.done and 2 in observer.globals, timeout=90)
    stop([agg_loop, *loops], agents, agg, observer)
    assert agg.republished >= 1
    assert all(a.stats.rejected["old_version"] >= 1 for a in agents)  # v0 refused, not applied
    accepted = sorted(c.device_id for c in agent_cfgs)
    observer.assert_exact_average(round_id=2, version=2, accepted=accepted)


def test_an_update_the_aggregator_received_but_had_not_handled_is_delivered_again(
    tmp_path: Path,
    mosquitto,
    fleet_id: str,  # type: ignore[no-untyped-def]
) -> None:
    agg_cfg, agent_cfgs, observer, agg, agents = start(tmp_path, mosquitto.url, fleet_id, 2, 1)
    loops = [Loop(a) for a in agents]
    deadline = time.monotonic() + 60
    while agg.current is None or agg.current.answered:  # announce, but handle no answer
        assert time.monotonic() < deadline
        msg = agg.link.get(0.2)
        if msg is not None and "/update/" not in msg.topic:
            agg.handle(msg)
            agg.link.ack(msg)
        agg.tick()
    observer.wait_for(lambda: len(observer.updates.get(1, {})) == 2)
    time.sleep(0.5)  # both updates are in the aggregator's inbox, received, not handled
    # The process dies: no DISCONNECT, nothing acknowledged, the database as it is.
    agg.link._client._sock_close()  # type: ignore[attr-defined]
    agg.link._client.loop_stop()  # type: ignore[attr-defined]
    agg.store.db.close()
    again = build_aggregator(agg_cfg)
    assert again.current is not None and not again.current.answered
    again.start()
    loop = Loop(again)
    observer.wait_for(lambda: again.done and 1 in observer.globals)
    stop([loop, *loops], agents, again, observer)
    accepted = sorted(c.device_id for c in agent_cfgs)
    assert all(observer.sends[(1, d)] == 1 for d in accepted)  # not sent again: redelivered
    observer.assert_exact_average(round_id=1, version=1, accepted=accepted)

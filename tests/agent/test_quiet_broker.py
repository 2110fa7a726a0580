"""A quiet device against Mosquitto and the ACL ``fedge provision`` writes: it listens to every
round until its inbox brings a message, so a broker that will not deliver there never leaves
it deaf. Mosquitto 2.0 grants (MQTT 3.1.1) a subscription its ACL denies and then sends
nothing on it: the granted subscription proves nothing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fedge.agent.daemon import Agent
from fedge.models.runtime import load_runtime
from fedge.protocol import RoundAnnouncement, Status, Topics, TrainingConfig, encode
from fedge.protocol.paho_link import PahoLink
from helpers import DIGITS_MODEL
from mosquitto import MosquittoServer

from fedge.provision import AGGREGATOR, acl_text

pytestmark = pytest.mark.broker
FLEET = "quietacl"
DEVICE = "d1"
TOPICS = Topics(FLEET)


def broker(tmp_path: Path, *, inbox: bool) -> MosquittoServer:
    """Mosquitto (not started) with the fleet's ACL; without ``inbox``, one from before quiet
    devices (no read on ``inbox/{device}``)."""
    acl = acl_text(FLEET, {DEVICE: "device"})
    if not inbox:
        acl = "".join(line for line in acl.splitlines(True) if "/inbox/" not in line)
    path = tmp_path / "acl"
    path.write_text(acl)
    return MosquittoServer(extra_config=f"acl_file {path}\n")


@pytest.fixture
def closing() -> Iterator[list[Callable[[], None]]]:
    done: list[Callable[[], None]] = []
    yield done
    for close in reversed(done):
        close()


def quiet_agent(server: MosquittoServer) -> tuple[Agent, list[Status]]:
    """The quiet agent, and the statuses it publishes."""
    link = PahoLink(server.host, server.port, DEVICE, username=DEVICE)
    agent = Agent(
        device_id=DEVICE,
        fleet=FLEET,
        link=link,
        runtime=load_runtime(DIGITS_MODEL, prefer=("numpy",)),
        data=lambda: None,  # never selected here: never trains
        rng=np.random.default_rng(0),
        quiet=True,
    )
    said: list[Status] = []
    agent.on_status = said.append
    return agent, said


def announcement(round_id: int) -> bytes:
    ann = RoundAnnouncement(
        fleet=FLEET,
        round_id=round_id,
        model_version=0,
        deadline=4e9,
        selected=("someone-else",),
        config=TrainingConfig(),
    )
    return encode(ann)


def until(agent: Agent, done: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        agent.step(0.1)
    return done()


@pytest.mark.parametrize("online", [True, False], ids=["broker up", "broker up later"])
def test_a_quiet_device_whose_broker_denies_its_inbox_hears_every_round(
    tmp_path: Path, closing: list[Callable[[], None]], online: bool
) -> None:
    """The subscription is granted yet nothing comes; also when the broker comes up only
    after the agent started (a device that boots before its network)."""
    server = broker(tmp_path, inbox=False)
    closing.append(server.close)
    if online:
        server.start()
    agent, said = quiet_agent(server)
    closing.append(agent.link.close)
    agent.start(timeout=0.5, keep_trying=True)
    if not online:
        server.start()
    agg = PahoLink(server.host, server.port, AGGREGATOR, username=AGGREGATOR)
    closing.append(agg.close)
    agg.connect()
    agg.publish(TOPICS.round, announcement(1), retain=True)
    assert until(agent, lambda: agent.state.round_seen == 1), server.log_tail()
    agg.publish(TOPICS.inbox(DEVICE), announcement(2))  # the ACL drops it
    agg.publish(TOPICS.round, announcement(3), retain=True)
    assert until(agent, lambda: agent.state.round_seen == 3)
    # It still says it is quiet (the aggregator keeps sending to its inbox), and listens:
    # its statuses say so, and the aggregator counts it awake in every round.
    assert agent.quiet and agent.listening
    assert said and all(s.quiet and s.listening for s in said)


def test_a_quiet_device_stops_listening_to_every_round_once_its_inbox_works(
    tmp_path: Path, closing: list[Callable[[], None]]
) -> None:
    server = broker(tmp_path, inbox=True).start()
    closing.append(server.close)
    agent, said = quiet_agent(server)
    closing.append(agent.link.close)
    agent.start(timeout=10)
    agg = PahoLink(server.host, server.port, AGGREGATOR, username=AGGREGATOR)
    closing.append(agg.close)
    agg.connect()
    agg.publish(TOPICS.round, announcement(1), retain=True)
    assert until(agent, lambda: agent.state.round_seen == 1)  # before its inbox proved itself
    agg.publish(TOPICS.inbox(DEVICE), announcement(2))
    assert until(agent, lambda: agent.state.round_seen == 2)
    assert not agent.listening and said[-1].listening  # (it said so until now)
    # It says so soon, so that the aggregator stops sending it every round.
    assert until(agent, lambda: not said[-1].listening) and said[-1].quiet
    agg.publish(TOPICS.round, announcement(3), retain=True)  # does not wake it any more
    agg.publish(TOPICS.inbox(DEVICE), announcement(4))  # sent after round 3: comes after it
    msg = agent.link.get(10)
    assert msg is not None and msg.topic == TOPICS.inbox(DEVICE)
    agent.handle(msg)
    assert agent.state.round_seen == 4 and agent.link.get(0) is None

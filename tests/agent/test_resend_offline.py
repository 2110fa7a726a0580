"""The outbox's answer, sent again at start, stays in the outbox until the broker has it: a
device that restarts twice while the broker is out of reach still delivers it (paho keeps
an unacknowledged publish in memory only, which a restart loses)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fedge.agent.daemon import Agent
from fedge.agent.outbox import Outbox, Pending
from fedge.agent.state import AgentState, load_state, save_state
from fedge.models.runtime import load_runtime
from fedge.protocol import Topics
from fedge.protocol.paho_link import PahoLink
from helpers import DIGITS_MODEL
from mosquitto import MosquittoServer, free_port

pytestmark = pytest.mark.broker


def boot(tmp_path: Path, fleet: str, port: int) -> Agent:
    """The agent as the service builds it after a restart: the state from its file, or from
    the outbox when that is newer."""
    box = Outbox(tmp_path / "outbox")
    pending = box.take()
    state_file = tmp_path / "state.json"
    return Agent(
        device_id="d1",
        fleet=fleet,
        link=PahoLink("127.0.0.1", port, f"{fleet}-d1", close_timeout=0.2),
        runtime=load_runtime(DIGITS_MODEL),
        data=lambda: None,  # type: ignore[arg-type,return-value]  # no round comes
        state=load_state(state_file, answered=pending and pending.state),
        save_state=lambda s: save_state(state_file, s),
        outbox=box,
        rng=np.random.default_rng(0),
    )


def test_an_answer_sent_again_offline_survives_a_second_restart(
    tmp_path: Path, mosquitto: MosquittoServer, fleet_id: str
) -> None:
    """Killed while answering round 3; it boots with no network (the answer goes again, into
    the link's memory) and restarts once more before the broker is back. The outbox still
    holds the answer, and once online the broker gets it and the outbox goes."""
    topic = Topics(fleet_id).update("d1")
    state_file = tmp_path / "state.json"
    save_state(state_file, AgentState(last_round=2, round_seen=3, model_version=2))
    answered = AgentState(last_round=3, round_seen=3, model_version=2)
    update = Pending(3, "ab" * 8, topic, [b"round 3's update"], None, state=answered)
    Outbox(tmp_path / "outbox").put(update)
    offline = free_port()  # nothing listens there
    for _ in range(2):
        agent = boot(tmp_path, fleet_id, offline)
        agent.start(timeout=0.5, keep_trying=True)
        agent.stop()  # systemctl restart, a reboot, the watchdog
        assert Outbox(tmp_path / "outbox").take() == update
        assert load_state(state_file).last_round == 3  # answered: it is not trained again
    observer = PahoLink(mosquitto.host, mosquitto.port, f"{fleet_id}-observer")
    observer.connect()
    agent = boot(tmp_path, fleet_id, mosquitto.port)
    try:
        observer.subscribe(topic)
        agent.start()
        received = observer.get(10)
        assert received is not None and received.payload == b"round 3's update"
        assert agent.link.flush(10)  # the broker has acknowledged it
        assert not agent.step(0)  # idle: the outbox goes
        assert Outbox(tmp_path / "outbox").take() is None
    finally:
        agent.stop()
        observer.close()
    assert load_state(state_file).last_round == 3

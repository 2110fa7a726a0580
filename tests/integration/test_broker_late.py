"""A device service whose broker is not up yet waits for it (WARNING), it does not exit."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from fedge.agent.config import AgentConfig
from fedge.agent.service import build_agent
from fedge.protocol import Status, Topics, make_link
from fedge.protocol.status import decode_status
from helpers import DIGITS_MODEL

pytestmark = [pytest.mark.broker, pytest.mark.filterwarnings("ignore::ResourceWarning")]


def test_an_agent_started_before_its_broker_connects_when_it_comes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mosquitto import MosquittoServer

    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int32))
    broker = MosquittoServer()  # its port is chosen, nothing listens there yet
    cfg = AgentConfig(
        device_id="late-1",
        fleet="late",
        broker=broker.url,
        model=DIGITS_MODEL,
        data=data,
        state_dir=tmp_path,
    )
    agent = build_agent(cfg)
    with caplog.at_level(logging.WARNING, logger="fedge.protocol"):
        agent.start(timeout=1.0, keep_trying=True)  # returns: no exception, no exit
    assert any("trying on in the background" in r.getMessage() for r in caplog.records)
    stop = threading.Event()
    loop = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    loop.start()
    try:
        with broker:
            watcher = make_link(broker.url, "watcher")
            watcher.connect(timeout=5)
            watcher.subscribe(Topics("late").status("late-1"))
            msg = watcher.get(15.0)  # the queued "online" status, once paho reconnects
            assert msg is not None
            status, _ = decode_status(msg.payload)
            assert isinstance(status, Status) and status.state == "online"
            watcher.close()
            stop.set()
            loop.join(5)
            agent.stop()
    finally:
        stop.set()

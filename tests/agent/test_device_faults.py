"""Faults that must not stop the agent: a sample store that cannot be read, an anomaly score
that cannot be computed, a disk that takes no write. The agent sits the round out (or leaves
the score out), counts the fault and logs it when it starts; a crash would come back with the
retained round or model after every restart."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import numpy as np
import pytest
from fedge.agent.config import SerialConfig, TaskConfig
from fedge.agent.daemon import Agent
from fedge.agent.dataset import Dataset
from fedge.agent.outbox import Outbox, Pending
from fedge.agent.sensor_source import SensorSource
from fedge.agent.state import AgentState, load_state, save_state
from fedge.firmware_bridge.sample import Sample
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
    decode_skip,
    encode,
    is_skip,
)
from helpers import DIGITS_MODEL

pytestmark = pytest.mark.link
FLEET = "faults"
T = Topics(FLEET)
WEIGHTS = load_runtime(DIGITS_MODEL).get_weights()


class Fleet:
    """An aggregator's end of an in-memory broker, and one agent d1 on it."""

    def __init__(self, **agent_kw: object) -> None:
        self.broker = MemoryBroker()
        self.server = MemoryLink(self.broker, "server")
        self.server.connect()
        self.server.subscribe(T.updates)
        self.agent = Agent(
            device_id="d1",
            fleet=FLEET,
            link=MemoryLink(self.broker, "d1"),
            runtime=load_runtime(DIGITS_MODEL),
            rng=np.random.default_rng(0),
            **agent_kw,  # type: ignore[arg-type]
        )
        self.agent.start()

    def model(self, version: int) -> None:
        header = GlobalModelHeader(fleet=FLEET, model_version=version, round_id=version)
        self.server.publish(T.global_model, encode(header, WEIGHTS), retain=True)
        self.drain()

    def round(self, round_id: int, selected: tuple[str, ...] = ("d1",)) -> list:
        """Announce a round (on model v0) and return what d1 sent: update headers and skip
        notices."""
        ann = RoundAnnouncement(
            fleet=FLEET,
            round_id=round_id,
            model_version=0,
            deadline=2e9,
            selected=selected,
            config=TrainingConfig(
                epochs=1, batch_size=8, lr=0.1, codec="float32", gate=GateSettings(threshold=0)
            ),
        )
        self.server.publish(T.round, encode(ann), retain=True)
        self.drain()
        out = []
        while (msg := self.server.get(0)) is not None:
            if msg.topic == T.update("d1"):
                out.append(
                    decode_skip(msg.payload, "d1")
                    if is_skip(msg.payload)
                    else decode(msg.payload).msg
                )
        return out

    def drain(self) -> None:
        while self.agent.step(0):
            pass


def sensor(tmp_path: Path, task: TaskConfig) -> SensorSource:
    """A sensor whose store holds 2-channel samples, then 3-channel ones (a firmware update):
    the latest samples cannot be read as one array."""
    src = SensorSource(SerialConfig(port="loop://"), task, tmp_path / "s.sqlite")
    src._write([Sample(1, i, i, (float(i), 0.0)) for i in range(30)])
    src._write([Sample(1, 30 + i, 30 + i, (float(i), 0.0, 1.0)) for i in range(2)])
    return src


def test_a_round_whose_samples_cannot_be_read_is_sat_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = sensor(tmp_path, TaskConfig(kind="forecast", window=4, min_examples=1))
    f = Fleet(data=src.dataset)
    f.model(0)
    with caplog.at_level(logging.ERROR, logger="fedge.agent"):
        for round_id in (1, 2):
            [notice] = f.round(round_id)
            assert notice.reason == "not_ready" and not notice.trained
    assert f.agent.stats.skipped["not_ready"] == 2 and f.agent.stats.faults["data"] == 2
    assert f.agent.state.last_round == 2
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]  # once, not each round
    assert "cannot read the training data" in record.message
    assert "channels in one query" in record.message
    src.stop()


@pytest.mark.parametrize(
    "latest",
    [
        [(5.0, 0.0), (6.0, 0.0, 1.0)],  # two channel counts in the window: StoreError
        [(5.0, 0.0, 1.0)] * 4,  # a window of three channels, scaled for two: ValueError
    ],
)
def test_a_model_is_applied_when_its_anomaly_score_cannot_be_computed(
    tmp_path: Path, latest: list[tuple[float, ...]]
) -> None:
    task = TaskConfig(kind="autoencode", window=4, center=(0.0, 0.0), scale=(1.0, 1.0))
    src = SensorSource(SerialConfig(port="loop://"), task, tmp_path / "s.sqlite")
    src._write([Sample(1, i, i, (float(i), 0.0)) for i in range(30)])
    src._write([Sample(1, 30 + i, 30 + i, values) for i, values in enumerate(latest)])
    rng = np.random.default_rng(0)
    data = Dataset(rng.random((40, 64), np.float32), rng.integers(0, 10, 40).astype(np.int32))
    f = Fleet(data=data, sensor=src)  # the agent starts and stops the sensor
    f.model(0)
    assert f.agent.global_version == 0 and f.agent.state.model_version == 0
    assert f.agent.anomaly_score is None and f.agent.stats.faults["anomaly_score"] == 1
    [update] = f.round(1)  # and the device goes on answering rounds
    assert isinstance(update, UpdateHeader)
    f.agent.stop()


def test_a_full_disk_sits_rounds_out_until_it_takes_writes_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The outbox and the state file cannot be written: a selected round is sat out (its
    update never leaves without the outbox), the state stays in memory, nothing crashes. Once
    the disk takes writes again the state is saved and rounds are answered."""
    state_file = tmp_path / "state.json"
    full = True

    def save(state: AgentState) -> None:
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        save_state(state_file, state)

    box = Outbox(tmp_path / "outbox")
    put = box.put

    def put_unless_full(pending: Pending) -> None:
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        put(pending)

    monkeypatch.setattr(box, "put", put_unless_full)
    rng = np.random.default_rng(0)
    data = Dataset(rng.random((40, 64), np.float32), rng.integers(0, 10, 40).astype(np.int32))
    with caplog.at_level(logging.ERROR, logger="fedge.agent"):
        f = Fleet(data=data, save_state=save, outbox=box)
        f.model(0)
        [notice] = f.round(1)
        assert notice.reason == "other" and f.agent.outcome == ("failed", "other")
        assert f.round(2, selected=("d2",)) == []  # not selected: remembered in memory
        assert not state_file.exists() and box.take() is None
    assert f.agent.stats.failed == 1 and f.agent.stats.faults["disk"] >= 3
    assert f.agent.state.last_round == 1 and f.agent.state.round_seen == 2
    [record] = caplog.records  # one fault, said once
    assert "No space left on device" in record.message
    full = False
    assert not f.agent.step(0)  # idle: the state is saved now
    assert load_state(state_file).round_seen == 2
    [update] = f.round(3)
    assert isinstance(update, UpdateHeader) and box.take() is not None


def test_a_restart_on_a_full_disk_sends_the_outbox_again_and_keeps_it(tmp_path: Path) -> None:
    """The outbox holds round 3's answer and the state it leaves; the state file cannot be
    written at start: the answer goes again, and the outbox keeps covering it."""
    box = Outbox(tmp_path / "outbox")
    answered = AgentState(last_round=3, round_seen=3, model_version=2)
    box.put(Pending(3, "ab" * 8, T.update("d1"), [b"round 3's update"], None, state=answered))

    def full(state: AgentState) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    f = Fleet(
        data=lambda: None,
        state=load_state(tmp_path / "state.json", answered=answered),
        save_state=full,
        outbox=Outbox(box.path),
    )
    assert [m.payload for m in iter(lambda: f.server.get(0), None)] == [b"round 3's update"]
    assert f.agent.stats.faults["disk"] == 1 and f.agent.state.last_round == 3
    assert Outbox(box.path).take() is not None

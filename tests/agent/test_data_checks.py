"""The agent checks its data where it enters: the data file at start, sensor samples as they
are stored (non-finite ones are dropped and counted) and sensor examples every round."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from fedge.agent.config import AgentConfig, SerialConfig, TaskConfig
from fedge.agent.dataset import DatasetError, load_npz
from fedge.agent.sensor_source import SensorSource
from fedge.agent.service import build_agent
from fedge.agent.store import NON_FINITE_LOG_EVERY, SampleStore
from fedge.agent.tasks import TaskError
from fedge.firmware_bridge.sample import Sample
from fedge.firmware_bridge.simulator import open_pty
from fedge.models.checks import ModelIO, model_io
from fedge.protocol import MemoryBroker, MemoryLink
from helpers import DIGITS_MODEL, REPO

FORECASTER = REPO / "models" / "artifacts" / "machine_forecaster.tflite"


def sample(i: int, *values: float, label: int | None = None) -> Sample:
    return Sample(1, i, i, tuple(values), label)


@pytest.mark.unit
def test_load_npz_checks_against_the_model(tmp_path: Path) -> None:
    fits = model_io(DIGITS_MODEL)
    path = tmp_path / "part.npz"
    np.savez(path, x=np.ones((6, 64)), y=np.arange(7, 13))
    with pytest.raises(DatasetError) as info:
        load_npz(path, fits)
    assert str(info.value) == (
        f"{path}: labels 7-12 but the model has 10 classes (0-9); 3 of 6 samples are out of range"
    )
    np.savez(path, x=np.ones((6, 64)), y=np.arange(6))
    data = load_npz(path, fits)
    assert data.x.dtype == np.float32 and data.y.dtype == np.int32 and len(data) == 6


@pytest.mark.unit
def test_regression_targets_stay_floats(tmp_path: Path) -> None:
    path = tmp_path / "part.npz"
    y = np.linspace(0, 1, 20, dtype=np.float32).reshape(4, 5)
    np.savez(path, x=np.ones((4, 80)), y=y)
    data = load_npz(path, model_io(FORECASTER))
    assert data.y.dtype == np.float32 and np.array_equal(data.y, y)  # not cast to class numbers


@pytest.mark.unit
def test_good_data_builds_an_agent(tmp_path: Path) -> None:
    path = tmp_path / "part.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.random((30, 64)), y=rng.integers(0, 10, 30))
    cfg = AgentConfig(device_id="pi-1", model=DIGITS_MODEL, data=path, state_dir=tmp_path)
    agent = build_agent(cfg, link=MemoryLink(MemoryBroker(), "pi-1"))
    assert len(agent.data) == 30  # type: ignore[arg-type]


@pytest.mark.unit
def test_the_store_drops_and_counts_non_finite_samples(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SampleStore(tmp_path / "s.sqlite")
    with caplog.at_level(logging.WARNING, logger="fedge.agent"):
        written = store.append(
            [
                sample(0, 1.0, 2.0),
                sample(1, float("nan"), 2.0),
                sample(2, 3.0, float("inf")),
                sample(3, 4.0, 1e39),  # beyond float32: inf once stored
                sample(4, 5.0, 6.0),
            ]
        )
    assert written == 2 and store.count() == 2 and store.non_finite_dropped == 3
    assert store.latest(10).tolist() == [[1.0, 2.0], [5.0, 6.0]]  # the finite data is kept
    drops = [r for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(drops) == 1  # the first is logged ...
    assert "channel(s) [0]" in drops[0].getMessage() and "1 dropped so far" in drops[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedge.agent"):
        store.append([sample(i, float("nan")) for i in range(2 * NON_FINITE_LOG_EVERY)])
    logged = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert store.non_finite_dropped == 3 + 2 * NON_FINITE_LOG_EVERY
    assert len(logged) == 2  # ... then every Nth
    assert f"{NON_FINITE_LOG_EVERY} dropped so far" in logged[0]
    store.close()


@pytest.mark.link
def test_nan_from_the_serial_port_is_dropped_and_counted(tmp_path: Path) -> None:
    master, port = open_pty(tmp_path / "ttyS")
    src = SensorSource(
        SerialConfig(port=port, format="text"),
        TaskConfig(kind="forecast", window=2, min_examples=1),
        tmp_path / "s.sqlite",
    )
    src.reader.backoff = (0.05, 0.2)
    handed: list[int] = []  # samples the reader thread has handed over and the store has taken
    write = src.reader.on_samples

    def written(samples: Sequence[Sample]) -> None:
        write(samples)
        handed.append(len(samples))

    src.reader.on_samples = written
    src.start()
    try:
        assert src.reader.connected.wait(5)
        lines = [f"{i},{i + 1}" for i in range(10)]
        lines[3], lines[6] = "nan,4", "7,inf"
        os.write(master, ("\n".join(lines) + "\n").encode())
        end = time.monotonic() + 5
        while sum(handed) < 10 and time.monotonic() < end:
            time.sleep(0.02)
        assert src.counters["samples"] == 10 and src.counters["non_finite_dropped"] == 2
        data = src.dataset()
        assert np.isfinite(data.x).all() and np.isfinite(data.y).all()
        assert len(data) == 8 - 2  # 8 finite samples stored, windows of 2 plus the next one
    finally:
        src.stop()
        os.close(master)


@pytest.mark.unit
def test_sensor_examples_that_do_not_fit_the_model_are_not_trained_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fits = ModelIO(sample_shape=(8,), outputs=3, task="classify")
    src = SensorSource(
        SerialConfig(port="loop://"),
        TaskConfig(kind="classify", window=4, min_examples=1),
        tmp_path / "s.sqlite",
        model=fits,
    )
    src._write([sample(i, float(i), 0.0, label=i % 5) for i in range(12)])  # labels up to 4
    with caplog.at_level(logging.WARNING, logger="fedge.agent"):
        for _ in range(3):
            with pytest.raises(TaskError, match=r"labels 0-4 but the model has 3 classes \(0-2\)"):
                src.dataset()
    warned = [r for r in caplog.records if "do not fit the model" in r.getMessage()]
    assert len(warned) == 1  # once, not every round
    assert "loop:// (classify, window 4): labels 0-4" in warned[0].getMessage()
    src._write([sample(i, float(i), 0.0, label=i % 3) for i in range(12, 40)])
    src.task = TaskConfig(kind="classify", window=4, min_examples=1, history=28)
    data = src.dataset()
    assert data.y.max() == 2 and data.x.shape[1] == 8
    src.stop()


@pytest.mark.unit
def test_a_store_with_old_nan_rows_still_trains(tmp_path: Path) -> None:
    """Rows stored before non-finite samples were dropped are left out of the examples."""
    import sqlite3

    path = tmp_path / "s.sqlite"
    SampleStore(path).close()
    db = sqlite3.connect(path)
    for i in range(12):
        value = float("nan") if i == 5 else float(i)
        db.execute(
            'INSERT INTO samples(sensor_id, seq, ts_ms, "values", label) VALUES (1, ?, 0, ?, NULL)',
            (i, np.array([value], "<f4").tobytes()),
        )
    db.commit()
    db.close()
    src = SensorSource(
        SerialConfig(port="loop://"),
        TaskConfig(kind="forecast", window=2, min_examples=1),
        path,
        model=ModelIO(sample_shape=(2,), outputs=1, task="regress", target_shape=(1,)),
    )
    data = src.dataset()
    assert len(data) == 11 - 2 and np.isfinite(data.x).all()
    src.stop()

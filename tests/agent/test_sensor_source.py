"""The sensor source turns stored samples into examples, labels and anomaly scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fedge.agent.config import SerialConfig, TaskConfig
from fedge.agent.sensor_source import SensorSource
from fedge.agent.tasks import TaskError
from fedge.firmware_bridge.sample import Sample
from fedge.models.runtime import NumpyRuntime
from fedge.models.spec import DenseLayer, ModelSpec

pytestmark = pytest.mark.unit


def source(tmp_path: Path, **task: object) -> SensorSource:
    return SensorSource(SerialConfig(port="loop://"), TaskConfig(**task), tmp_path / "s.sqlite")  # type: ignore[arg-type]


def test_not_ready_until_there_are_samples(tmp_path: Path) -> None:
    src = source(tmp_path, kind="forecast", window=4, min_examples=10)
    with pytest.raises(TaskError, match="no samples"):
        src.dataset()
    src._write([Sample(1, i, i, (float(i), 0.0)) for i in range(8)])
    with pytest.raises(TaskError, match="want at least 10"):
        src.dataset()
    src._write([Sample(1, i, i, (float(i), 0.0)) for i in range(8, 30)])
    data = src.dataset()
    assert data.x.shape == (26, 8) and data.y.shape == (26, 2)
    src.stop()


def test_classify_uses_the_label_channel(tmp_path: Path) -> None:
    src = source(tmp_path, kind="classify", window=3, min_examples=1)
    src._write([Sample(1, i, i, (float(i),), label=i % 3) for i in range(12)])
    src._write([Sample(1, 99, 99, (5.0,))])  # an unlabelled reading is not an example
    data = src.dataset()
    assert data.y.tolist() == [i % 3 for i in range(2, 12)]
    src.stop()


def test_anomaly_score_rises_for_an_unusual_window(tmp_path: Path) -> None:
    src = source(tmp_path, kind="autoencode", window=4, center=(0.0,), scale=(1.0,))
    spec = ModelSpec(
        name="ae",
        input_size=4,
        layers=(DenseLayer(units=2, activation="linear"),),
        outputs=4,
        loss="mse",
        seed=0,
    )
    rt = NumpyRuntime(spec)
    normal = np.sin(np.arange(400) / 3.0).astype(np.float32)
    x = np.lib.stride_tricks.sliding_window_view(normal, 4).astype(np.float32)
    for _ in range(300):
        rt.train_step(x, x, 0.1)
    src._write([Sample(1, i, i, (float(v),)) for i, v in enumerate(normal[:50])])
    usual = src.anomaly_score(rt)
    src._write([Sample(1, 50 + i, 50 + i, (v,)) for i, v in enumerate([3.0, -3.0, 3.0, -3.0])])
    unusual = src.anomaly_score(rt)
    assert usual is not None and unusual is not None and unusual > 20 * usual
    assert source(tmp_path / "other", kind="forecast").anomaly_score(rt) is None
    src.stop()


def test_a_batch_the_store_cannot_take_is_counted_and_the_reader_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A store that fails (here: its path is a folder) loses that batch, counted and logged
    once; the reader thread's callback does not raise, and once the store can be opened the
    next batch is stored."""
    folder = tmp_path / "s.sqlite"
    folder.mkdir()
    src = source(tmp_path, kind="forecast", window=2, min_examples=1)
    with caplog.at_level("ERROR", "fedge.agent"):
        src._write([Sample(1, i, i, (float(i),)) for i in range(5)])
        src._write([Sample(1, i, i, (float(i),)) for i in range(5, 8)])
    assert src.counters["store_failed"] == 8
    assert [r.getMessage() for r in caplog.records if "not stored" in r.getMessage()] == [
        f"sample store {folder}: open failed: unable to open database file; 5 samples not"
        " stored so far (1 batches)"
    ]
    folder.rmdir()
    src._write([Sample(1, i, i, (float(i),)) for i in range(8, 12)])
    assert src.counters["store_failed"] == 8 and len(src.dataset().x) == 2
    src.stop()

"""Windows of a stream become examples; labels come from the stream itself."""

from __future__ import annotations

import numpy as np
import pytest
from fedge.agent import tasks

pytestmark = pytest.mark.unit


def stream(n: int = 10, channels: int = 2) -> np.ndarray:
    return np.arange(n * channels, dtype=np.float32).reshape(n, channels)


def test_forecast_predicts_the_next_sample_from_the_window() -> None:
    v = stream()
    x, y = tasks.forecast(v, 3)
    assert x.shape == (7, 6) and y.shape == (7, 2)
    np.testing.assert_array_equal(x[0], v[0:3].ravel())
    np.testing.assert_array_equal(y[0], v[3])
    np.testing.assert_array_equal(y[-1], v[-1])
    _, y1 = tasks.forecast(v, 3, targets=[1])
    np.testing.assert_array_equal(y1[:, 0], v[3:, 1])


def test_last_value_baseline_on_a_ramp() -> None:
    v = stream()  # every channel rises by 2 per sample
    assert tasks.last_value_baseline(v, 3) == pytest.approx(4.0)


def test_autoencode_and_anomaly_score() -> None:
    v = stream()
    x, y = tasks.autoencode(v, 4)
    assert x.shape == (7, 8)
    np.testing.assert_array_equal(x, y)
    scores = tasks.reconstruction_error(x + np.eye(7, 8, dtype=np.float32) * 4, x)
    np.testing.assert_allclose(scores, 16 / 8)


def test_classify_takes_the_label_at_the_window_end() -> None:
    v = stream()
    labels = np.arange(10)
    x, y = tasks.classify(v, labels, 3)
    assert y.tolist() == list(range(2, 10)) and x.shape == (8, 6)


def test_errors() -> None:
    with pytest.raises(tasks.TaskError, match="too few"):
        tasks.forecast(stream(3), 3)
    with pytest.raises(tasks.TaskError, match="label channel"):
        tasks.examples("classify", stream(), 2)
    with pytest.raises(tasks.TaskError, match="labels for"):
        tasks.classify(stream(), np.arange(3), 2)

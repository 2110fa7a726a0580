"""The failure task: labels come from the device's own failures, and only from what it saw."""

from __future__ import annotations

import numpy as np
import pytest
from fedge.agent import tasks

pytestmark = pytest.mark.unit


def stream(n: int, trips: list[int]) -> np.ndarray:
    """One sensor channel counting readings, and the event channel."""
    v = np.zeros((n, 2), np.float32)
    v[:, 0] = np.arange(n)
    v[trips, 1] = 1.0
    return v


def test_windows_before_a_failure_are_positive_and_the_rest_negative() -> None:
    x, y = tasks.failure(stream(30, [20]), window=3, horizon=5, balance=False)
    ends = x[:, -1].astype(int)  # the sensor channel holds the reading's index
    assert set(ends[y == 1]) == {15, 16, 17, 18, 19}
    # Negatives: more than 5 readings before the failure, or after it with 5 readings seen.
    assert set(ends[y == 0]) == set(range(2, 15)) | {23, 24}
    assert x.shape[1] == 3  # the event channel is not an input


def test_a_device_that_never_failed_has_only_negatives_and_leaves_out_the_recent_past() -> None:
    x, y = tasks.failure(stream(30, []), window=3, horizon=5)
    assert len(x) == 30 - 2 - 5 and not y.any()  # the last 5 readings' future is unknown


def test_positives_are_repeated_to_balance_the_classes() -> None:
    _, y = tasks.failure(stream(100, [60]), window=3, horizon=5)
    assert 0.4 < y.mean() < 0.6


def test_a_horizon_below_one_reading_is_refused() -> None:
    with pytest.raises(tasks.TaskError):
        tasks.failure(stream(30, []), window=3, horizon=0)

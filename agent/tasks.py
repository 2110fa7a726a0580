"""Tasks: how windows of a sensor stream become training examples (pure functions).

Chosen in the agent config; each turns ``values`` (n samples x c channels, oldest first)
into ``(x, y)`` for the model:

- ``forecast``: predict the next reading from the last ``window`` (labels come free from the
  stream); x is the flattened window, y the next sample's ``targets`` channels.
- ``autoencode``: reconstruct the window itself; the reconstruction error of a new window is
  an anomaly score (:func:`reconstruction_error`).
- ``classify``: the stream carries a label channel; y is the label at the window's end.
- ``failure``: will the machine fail within the next ``horizon`` readings? The stream carries
  an event channel that is 1 on the reading at which the machine failed (its protection
  tripped; a new one is installed after it), so the labels come from the device's own
  history: a window is positive when a failure follows within the horizon, negative when
  ``horizon`` readings followed without one; windows too close to the present to tell, and
  windows that span a failure, are left out. A device that has never seen a failure still
  has negatives to offer. Positives are repeated until they roughly match the negatives
  (failures are rare; an unweighted loss would learn never to warn).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

Task = Literal["forecast", "autoencode", "classify", "failure"]


class TaskError(ValueError):
    """Not enough samples, or a window that does not fit the data."""


def _windows(values: np.ndarray, window: int, extra: int) -> np.ndarray:
    """Every run of ``window`` consecutive samples that leaves ``extra`` samples after it."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise TaskError(f"want samples x channels, got shape {values.shape}")
    if window < 1:
        raise TaskError("window must be at least 1")
    count = len(values) - window - extra + 1
    if count < 1:
        raise TaskError(f"{len(values)} samples are too few for a window of {window}")
    view = np.lib.stride_tricks.sliding_window_view(values, window, axis=0)[:count]
    return view.transpose(0, 2, 1)  # (count, window, channels)


def forecast(
    values: np.ndarray, window: int, targets: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    wins = _windows(values, window, extra=1)
    cols = list(range(values.shape[1])) if targets is None else list(targets)
    x = wins.reshape(len(wins), -1)
    y = np.asarray(values, np.float32)[window : window + len(wins)][:, cols]
    return x, y


def last_value_baseline(
    values: np.ndarray, window: int, targets: Sequence[int] | None = None
) -> float:
    """Mean squared error of predicting each next reading as the last one seen."""
    x, y = forecast(values, window, targets)
    channels = values.shape[1]
    cols = list(range(channels)) if targets is None else list(targets)
    last = x[:, (window - 1) * channels :][:, cols]
    return float(np.mean((last - y) ** 2))


def autoencode(values: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    x = _windows(values, window, extra=0).reshape(-1, window * values.shape[1])
    return x, x.copy()


def classify(values: np.ndarray, labels: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    if len(labels) != len(values):
        raise TaskError(f"{len(labels)} labels for {len(values)} samples")
    wins = _windows(values, window, extra=0)
    return wins.reshape(len(wins), -1), labels[window - 1 : window - 1 + len(wins)].astype(np.int32)


def failure_features(values: np.ndarray, window: int, event_channel: int = -1) -> np.ndarray:
    """Every window of the sensor channels (the event channel left out), flattened:
    ``x[k]`` ends at reading ``window - 1 + k``. What the model sees at inference."""
    values = np.asarray(values, np.float32)
    if values.ndim != 2 or values.shape[1] < 2:
        raise TaskError(f"want samples x (sensors + event) channels, got shape {values.shape}")
    sensors = np.delete(values, event_channel % values.shape[1], axis=1)
    wins = _windows(sensors, window, extra=0)
    return wins.reshape(len(wins), -1)


def failure(
    values: np.ndarray, window: int, horizon: int, event_channel: int = -1, *, balance: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(x, y): y is 1 when a failure follows a window within ``horizon`` readings."""
    if horizon < 1:
        raise TaskError("horizon must be at least 1 reading")
    values = np.asarray(values, np.float32)
    x = failure_features(values, window, event_channel)
    n = len(values)
    event = values[:, event_channel % values.shape[1]] > 0.5
    ends = np.arange(window - 1, n)
    trips = np.flatnonzero(event)
    padded = np.append(trips, n)  # n: no failure seen (yet)
    # The first failure at or after each window's end.
    next_trip = padded[np.searchsorted(trips, ends)]
    # A window that contains a failure spans two machines (or a failed one): left out.
    spans = padded[np.searchsorted(trips, ends - window + 1)] <= ends
    positive = (next_trip < n) & (next_trip - ends <= horizon) & ~spans
    negative = (next_trip - ends > horizon) & (ends + horizon <= n - 1) & ~spans
    keep = positive | negative
    x, y = x[keep], positive[keep].astype(np.int32)
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    if balance and 0 < pos < neg:
        reps = np.where(y == 1, max(1, round(neg / pos)), 1)
        x, y = np.repeat(x, reps, axis=0), np.repeat(y, reps)
    return x, y


def examples(
    task: Task,
    values: np.ndarray,
    window: int,
    *,
    labels: np.ndarray | None = None,
    targets: Sequence[int] | None = None,
    horizon: int = 60,
) -> tuple[np.ndarray, np.ndarray]:
    if task == "forecast":
        return forecast(values, window, targets)
    if task == "autoencode":
        return autoencode(values, window)
    if task == "failure":
        return failure(values, window, horizon)
    if labels is None:
        raise TaskError("the classify task needs a label channel")
    return classify(values, labels, window)


def reconstruction_error(reconstructed: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per-window mean squared error: the anomaly score of the autoencode task."""
    diff = np.asarray(reconstructed, np.float32) - np.asarray(x, np.float32)
    return np.mean(diff * diff, axis=1)

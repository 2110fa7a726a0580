"""Tasks: how windows of a sensor stream become training examples (pure functions).

Chosen in the agent config; each turns ``values`` (n samples x c channels, oldest first)
into ``(x, y)`` for the model:

- ``forecast``: predict the next reading from the last ``window`` (labels come free from the
  stream); x is the flattened window, y the next sample's ``targets`` channels.
- ``autoencode``: reconstruct the window itself; the reconstruction error of a new window is
  an anomaly score (:func:`reconstruction_error`).
- ``classify``: the stream carries a label channel; y is the label at the window's end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

Task = Literal["forecast", "autoencode", "classify"]


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


def examples(
    task: Task,
    values: np.ndarray,
    window: int,
    *,
    labels: np.ndarray | None = None,
    targets: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    if task == "forecast":
        return forecast(values, window, targets)
    if task == "autoencode":
        return autoencode(values, window)
    if labels is None:
        raise TaskError("the classify task needs a label channel")
    return classify(values, labels, window)


def reconstruction_error(reconstructed: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per-window mean squared error: the anomaly score of the autoencode task."""
    diff = np.asarray(reconstructed, np.float32) - np.asarray(x, np.float32)
    return np.mean(diff * diff, axis=1)

"""The device's local training set. For now a ``.npz`` partition with ``x`` and ``y``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fedge.models.checks import DataError, ModelIO, check_data, read_npz


class DatasetError(ValueError):
    """The local data file is unreadable or does not fit the model (one line naming it)."""


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray  # (n, features) float32
    y: np.ndarray  # (n,) int32 labels, or (n, outputs) float32 targets for regression

    def __len__(self) -> int:
        return int(self.y.shape[0])


def load_npz(path: str | Path, model: ModelIO | None = None) -> Dataset:
    """Read ``path`` and check it against ``model``: shapes, label range, finiteness.

    Without ``model`` only the form is checked: x (n, features) and y (n,) class labels.
    """
    path = Path(path)
    try:
        x, y = read_npz(path)
        if model is not None:
            return Dataset(*check_data(model, x, y, name=str(path)))
    except DataError as exc:
        raise DatasetError(str(exc)) from exc
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        raise DatasetError(f"{path}: want x (n, features) and y (n,), got {x.shape} and {y.shape}")
    try:
        return Dataset(np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int32))
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{path}: x and y must be numbers ({exc})") from exc

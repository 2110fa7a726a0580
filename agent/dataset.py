"""The device's local training set. For now a ``.npz`` partition with ``x`` and ``y``."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DatasetError(ValueError):
    """The local data file is unreadable or has the wrong shape for the model."""


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray  # (n, features) float32
    y: np.ndarray  # (n,) int32 labels, or (n, outputs) float32 targets for regression

    def __len__(self) -> int:
        return int(self.y.shape[0])


def load_npz(path: str | Path) -> Dataset:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz or "y" not in npz:
                raise DatasetError(f"{path}: needs arrays 'x' and 'y', has {sorted(npz.files)}")
            x = np.asarray(npz["x"], dtype=np.float32)
            y = np.asarray(npz["y"], dtype=np.int32)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(f"{path}: not a readable .npz ({exc})") from exc
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        raise DatasetError(f"{path}: want x (n, features) and y (n,), got {x.shape} and {y.shape}")
    return Dataset(x, y)

"""Small builders shared by tests: configs, data partitions and in-memory fleets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DIGITS_MODEL = REPO / "models" / "artifacts" / "digits_mlp.tflite"


def digits_partitions(tmp: Path, devices: int, seed: int = 0) -> tuple[list[Path], Path]:
    """IID digits partitions as .npz files, and the held-out test set."""
    from fedge.fleet.datasets import digits
    from fedge.fleet.partition import iid

    split = digits(seed)
    parts = iid(split.y_train, devices, np.random.default_rng(seed))
    paths = []
    for i, idx in enumerate(parts):
        p = tmp / f"dev{i}.npz"
        np.savez(p, x=split.x_train[idx], y=split.y_train[idx])
        paths.append(p)
    test = tmp / "test.npz"
    np.savez(test, x=split.x_test, y=split.y_test)
    return paths, test

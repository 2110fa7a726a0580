"""Partitioners: which training samples each simulated device holds (pure functions).

Each returns one array of sample indices per device; together they cover every
sample exactly once.
"""

from __future__ import annotations

import numpy as np


def iid(y: np.ndarray, devices: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and deal out: every device gets about len(y)/devices samples, labels as a whole."""
    if devices < 1 or devices > len(y):
        raise ValueError(f"cannot split {len(y)} samples over {devices} devices")
    return [np.sort(part) for part in np.array_split(rng.permutation(len(y)), devices)]


def partition(
    scheme: str, y: np.ndarray, devices: int, rng: np.random.Generator
) -> list[np.ndarray]:
    if scheme == "iid":
        return iid(y, devices, rng)
    raise ValueError(f"unknown partition scheme {scheme!r} (known: iid)")

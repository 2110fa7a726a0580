"""Federated averaging (McMahan et al. 2016) as a pure function over arrays.

``w_next = w + sum_i n_i * delta_i / sum_i n_i``, accumulated in float64 and
returned as float32, so the result does not depend on the order of the updates
beyond float64 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .strategy import Strategy, Weights


def weighted_mean(deltas: Sequence[Weights], counts: Sequence[int]) -> dict[str, np.ndarray]:
    if not deltas or len(deltas) != len(counts):
        raise ValueError("need one sample count per delta, and at least one delta")
    total = float(sum(counts))
    if total <= 0:
        raise ValueError("sample counts must add up to more than zero")
    out: dict[str, np.ndarray] = {}
    for name in deltas[0]:
        acc = np.zeros(np.shape(deltas[0][name]), dtype=np.float64)
        for delta, n in zip(deltas, counts, strict=True):
            acc += np.asarray(delta[name], dtype=np.float64) * (n / total)
        out[name] = acc
    return out


def fedavg(
    global_weights: Weights, deltas: Sequence[Weights], counts: Sequence[int]
) -> dict[str, np.ndarray]:
    mean = weighted_mean(deltas, counts)
    return {
        name: (np.asarray(w, dtype=np.float64) + mean[name]).astype(np.float32)
        for name, w in global_weights.items()
    }


class FedAvg(Strategy):
    """Plain federated averaging; a ``server_lr`` other than 1 scales the mean delta."""

    name = "fedavg"

    def __init__(self, server_lr: float = 1.0) -> None:
        self.server_lr = server_lr

    def step(
        self, weights: Weights, deltas: Sequence[Weights], counts: Sequence[int]
    ) -> dict[str, np.ndarray]:
        if self.server_lr == 1.0:
            return fedavg(weights, deltas, counts)
        mean = weighted_mean(deltas, counts)
        return {
            k: (np.asarray(w, np.float64) + self.server_lr * mean[k]).astype(np.float32)
            for k, w in weights.items()
        }

    def describe(self) -> str:
        return "fedavg" if self.server_lr == 1.0 else f"fedavg(server_lr={self.server_lr:g})"

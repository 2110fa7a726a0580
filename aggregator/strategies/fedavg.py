"""Federated averaging (McMahan et al. 2016): add the combined delta to the global model.

``w_next = w + server_lr * combined``, where ``combined`` is by default the sample-weighted
mean ``sum_i n_i * delta_i / sum_i n_i`` (``robust.weighted_mean``), accumulated in float64
and returned as float32, so the result does not depend on the order of the updates beyond
float64 rounding.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .base import Combiner, Strategy, Weights
from .robust import MEAN


def fedavg_step(
    weights: Weights, combined: Mapping[str, np.ndarray], *, server_lr: float = 1.0
) -> dict[str, np.ndarray]:
    """The next weights (float32): ``w + server_lr * combined``."""
    return {
        k: (np.asarray(w, np.float64) + server_lr * np.asarray(combined[k], np.float64)).astype(
            np.float32
        )
        for k, w in weights.items()
    }


class FedAvg(Strategy):
    """Plain federated averaging; a ``server_lr`` other than 1 scales the combined delta."""

    name = "fedavg"

    def __init__(self, server_lr: float = 1.0, combiner: Combiner = MEAN) -> None:
        self.server_lr = server_lr
        self.combiner = combiner

    def apply(self, weights: Weights, combined: Weights) -> dict[str, np.ndarray]:
        return fedavg_step(weights, combined, server_lr=self.server_lr)

    def optimiser(self) -> str:
        return "fedavg" if self.server_lr == 1.0 else f"fedavg(server_lr={self.server_lr:g})"

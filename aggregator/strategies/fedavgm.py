"""FedAvgM: federated averaging with server momentum (Hsu, Qi and Brown 2019).

``v <- momentum * v + combined``;  ``w <- w + server_lr * v``, with ``combined`` the round's
deltas combined (the sample-weighted mean unless configured otherwise). With ``momentum = 0``
and ``server_lr = 1`` it is FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .base import Combiner, Strategy, Weights
from .robust import MEAN


def fedavgm_step(
    weights: Weights,
    combined: Mapping[str, np.ndarray],
    velocity: Mapping[str, np.ndarray] | None,
    *,
    server_lr: float,
    momentum: float,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(next weights as float32, next velocity as float64)."""
    new_v = {
        k: momentum * (velocity[k] if velocity is not None else 0.0) + np.asarray(d, np.float64)
        for k, d in combined.items()
    }
    new_w = {
        k: (np.asarray(w, np.float64) + server_lr * new_v[k]).astype(np.float32)
        for k, w in weights.items()
    }
    return new_w, new_v


class FedAvgM(Strategy):
    name = "fedavgm"

    def __init__(
        self, server_lr: float = 1.0, momentum: float = 0.9, combiner: Combiner = MEAN
    ) -> None:
        self.server_lr = server_lr
        self.momentum = momentum
        self.combiner = combiner
        self.velocity: dict[str, np.ndarray] | None = None

    def apply(self, weights: Weights, combined: Weights) -> dict[str, np.ndarray]:
        new_w, self.velocity = fedavgm_step(
            weights,
            combined,
            self.velocity,
            server_lr=self.server_lr,
            momentum=self.momentum,
        )
        return new_w

    def state(self) -> dict[str, np.ndarray]:
        return {f"v/{k}": v for k, v in (self.velocity or {}).items()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        velocity = {
            k[2:]: np.asarray(v, np.float64) for k, v in state.items() if k.startswith("v/")
        }
        self.velocity = velocity or None

    def optimiser(self) -> str:
        return f"fedavgm(server_lr={self.server_lr:g}, momentum={self.momentum:g})"

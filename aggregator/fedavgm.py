"""FedAvgM: federated averaging with server momentum (Hsu, Qi and Brown 2019).

``v <- momentum * v + mean_delta``;  ``w <- w + server_lr * v``. With ``momentum = 0`` and
``server_lr = 1`` it is FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .fedavg import weighted_mean
from .strategy import Strategy, Weights


def fedavgm_step(
    weights: Weights,
    mean_delta: Mapping[str, np.ndarray],
    velocity: Mapping[str, np.ndarray] | None,
    *,
    server_lr: float,
    momentum: float,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(next weights as float32, next velocity as float64)."""
    new_v = {
        k: momentum * (velocity[k] if velocity is not None else 0.0) + np.asarray(d, np.float64)
        for k, d in mean_delta.items()
    }
    new_w = {
        k: (np.asarray(w, np.float64) + server_lr * new_v[k]).astype(np.float32)
        for k, w in weights.items()
    }
    return new_w, new_v


class FedAvgM(Strategy):
    name = "fedavgm"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        self.server_lr = server_lr
        self.momentum = momentum
        self.velocity: dict[str, np.ndarray] | None = None

    def step(
        self, weights: Weights, deltas: Sequence[Weights], counts: Sequence[int]
    ) -> dict[str, np.ndarray]:
        new_w, self.velocity = fedavgm_step(
            weights,
            weighted_mean(deltas, counts),
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

    def describe(self) -> str:
        return f"fedavgm(server_lr={self.server_lr:g}, momentum={self.momentum:g})"

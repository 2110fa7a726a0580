"""Local training: E epochs of shuffled mini-batches through whatever runtime is loaded.

No MQTT here, and no knowledge of which runtime runs the steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from fedge.models.runtime import Runtime

from .dataset import Dataset


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean batch loss over the last epoch
    steps: int
    samples: int  # examples in the local data set (the FedAvg weight)


def train_local(
    runtime: Runtime,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    rng: np.random.Generator,
    mu: float = 0.0,
    on_step: Callable[[], None] | None = None,
) -> TrainResult:
    """``mu > 0``: FedProx, pulled towards the weights the runtime was last set to.

    ``on_step`` is called after every batch (the service pets systemd's watchdog with it,
    so a long round on a slow device is not mistaken for a hang).
    """
    n = len(data)
    steps = 0
    losses: list[float] = []
    for _ in range(epochs):
        order = rng.permutation(n)
        losses = []
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            losses.append(runtime.train_step(data.x[idx], data.y[idx], lr, mu))
            steps += 1
            if on_step is not None:
                on_step()
    return TrainResult(float(np.mean(losses)) if losses else float("nan"), steps, n)

"""Server strategies: how the accepted deltas of a round become the next global model.

Each strategy is a small class around pure functions over arrays (in its own module),
holding whatever state it carries between rounds (server momentum, Adam moments) so the
aggregator can persist it next to the model it produced:

- ``fedavg``  (McMahan et al. 2016): ``w + mean_delta``, sample-weighted.
- ``fedavgm`` (Hsu et al. 2019): server momentum over the mean delta.
- ``fedadam`` (Reddi et al. 2021, "Adaptive Federated Optimization"): Adam on the server,
  with the mean delta as the pseudo-gradient.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Weights = Mapping[str, np.ndarray]

# Server step of FedAdam unless configured: tuned on digits over 0.003-0.1 (bench/README.md).
FEDADAM_SERVER_LR = 0.05


class StrategyConfig(BaseModel):
    """The ``[strategy]`` table of the aggregator config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # FedAdam is the default: on skewed data it beat FedAvg, FedAvgM and FedProx in
    # bench/noniid.py, and it matched them on IID data (figures in bench/README.md).
    name: Literal["fedavg", "fedavgm", "fedadam"] = "fedadam"
    server_lr: float | None = Field(default=None, gt=0, le=100)  # None: the strategy's default
    momentum: float = Field(default=0.9, ge=0, lt=1)  # fedavgm
    beta1: float = Field(default=0.9, ge=0, lt=1)  # fedadam
    beta2: float = Field(default=0.99, ge=0, lt=1)  # fedadam
    tau: float = Field(default=1e-3, gt=0, le=1)  # fedadam: adaptivity (epsilon)


class Strategy(ABC):
    name: str

    @abstractmethod
    def step(
        self, weights: Weights, deltas: Sequence[Weights], counts: Sequence[int]
    ) -> dict[str, np.ndarray]:
        """The next global model (float32) from this round's accepted deltas."""

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to persist with the model this strategy just produced."""
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:  # noqa: B027 - optional hook
        """Restore what :meth:`state` returned (after an aggregator restart)."""

    def describe(self) -> str:
        return self.name


def make_strategy(cfg: StrategyConfig) -> Strategy:
    from .fedadam import FedAdam
    from .fedavg import FedAvg
    from .fedavgm import FedAvgM

    if cfg.name == "fedavgm":
        return FedAvgM(server_lr=cfg.server_lr or 1.0, momentum=cfg.momentum)
    if cfg.name == "fedadam":
        return FedAdam(
            server_lr=cfg.server_lr or FEDADAM_SERVER_LR,
            beta1=cfg.beta1,
            beta2=cfg.beta2,
            tau=cfg.tau,
        )
    return FedAvg(server_lr=cfg.server_lr or 1.0)

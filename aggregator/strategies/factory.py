"""The strategy the ``[strategy]`` settings name."""

from __future__ import annotations

from .base import Strategy
from .config import StrategyConfig
from .fedadam import FEDADAM_SERVER_LR, FedAdam
from .fedavg import FedAvg
from .fedavgm import FedAvgM
from .robust import RobustCombiner


def make_strategy(cfg: StrategyConfig) -> Strategy:
    combiner = RobustCombiner(
        robust=cfg.robust, trim_fraction=cfg.trim_fraction, norm_bound=cfg.norm_bound
    )
    if cfg.name == "fedavgm":
        return FedAvgM(server_lr=cfg.server_lr or 1.0, momentum=cfg.momentum, combiner=combiner)
    if cfg.name == "fedadam":
        return FedAdam(
            server_lr=cfg.server_lr or FEDADAM_SERVER_LR,
            beta1=cfg.beta1,
            beta2=cfg.beta2,
            tau=cfg.tau,
            combiner=combiner,
        )
    return FedAvg(server_lr=cfg.server_lr or 1.0, combiner=combiner)

"""The ``[strategy]`` table of the aggregator config (documented in ``__init__.py``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .robust import Robust


class StrategyConfig(BaseModel):
    """The server optimiser, and how it combines a round's deltas."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # FedAdam is the default: on skewed data it beat FedAvg, FedAvgM and FedProx in
    # bench/noniid.py, and it matched them on IID data (figures in bench/README.md).
    name: Literal["fedavg", "fedavgm", "fedadam"] = "fedadam"
    server_lr: float | None = Field(default=None, gt=0, le=100)  # None: the strategy's default
    momentum: float = Field(default=0.9, ge=0, lt=1)  # fedavgm
    beta1: float = Field(default=0.9, ge=0, lt=1)  # fedadam
    beta2: float = Field(default=0.99, ge=0, lt=1)  # fedadam
    tau: float = Field(default=1e-3, gt=0, le=1)  # fedadam: adaptivity (epsilon)
    robust: Robust = "mean"  # how the round's deltas are combined (robust.py)
    trim_fraction: float = Field(default=0.2, ge=0, lt=0.5)  # trimmed_mean: cut at EACH end
    # 0: off; > 0: each delta scaled down to at most norm_bound x the round's median L2 norm
    norm_bound: float = Field(default=0.0, ge=0, allow_inf_nan=False)

"""Differential privacy on the aggregator (docs/privacy.md): the ``[privacy]`` table and the
pure steps of DP-FedAvg (McMahan et al. 2018) with adaptive clipping (Andrew et al. 2021).

Central DP, per round, on the updates of the selected devices, each clipped to ``C`` on the
device and again here after decoding::

    sum_i clip(delta_i)  +  N(0, (z_value * C)^2)  ->  / number selected  ->  strategy

Every device weighs 1 (its sample count would tell its data size, and a weight over 1 would
grow the sum's sensitivity beyond C); the denominator is the number of devices the round
selected, fixed before anyone trained, so dropouts and skips count as zero updates and the
divisor says nothing about the data. The server optimiser (FedAvg, FedAvgM, FedAdam) runs on
the noised mean: post-processing, which costs no privacy.

Adaptive clipping (``target_quantile``): each device reports whether its update's norm was
within ``C`` (one bit); the aggregator sums the bits centred at 1/2 with Gaussian noise of
standard deviation ``count_stddev``, and moves ``C`` geometrically toward the target quantile
of the norms: ``C <- C * exp(-clip_lr * (unclipped_fraction - target_quantile))``. The bit
sum costs privacy too; the noise on the updates is raised to ``z_value`` so that the two
Gaussians together spend what one with the configured ``z`` would (Andrew et al. 2021,
Theorem 1): ``z_value = (z^-2 - (2 count_stddev)^-2)^-1/2``.

Local DP: every device adds N(0, (z C)^2) to its clipped update itself; the aggregator
averages what arrives, uniformly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

Weights = Mapping[str, np.ndarray]

# The default noise on the bit count: 5% of the devices a round expects (as TensorFlow
# Federated's adaptive clipping does).
COUNT_STDDEV_SHARE = 0.05


class PrivacyConfig(BaseModel):
    """The aggregator's ``[privacy]`` table; absent: no differential privacy."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    mode: Literal["central", "local"]  # who adds the noise: the aggregator, or each device
    noise_multiplier: float = Field(gt=0, le=1000)  # z: noise std = z * clip
    clip: float = Field(default=1.0, gt=0, le=1e6)  # C (the initial one, when adaptive)
    # Adaptive clip (central DP only): the quantile of the update norms C moves toward;
    # None: C stays fixed.
    target_quantile: float | None = Field(default=None, gt=0, lt=1)
    clip_lr: float = Field(default=0.2, gt=0, le=10)  # how fast C moves (geometric)
    # Noise on the count of unclipped updates; None: 5% of the devices a round expects.
    count_stddev: float | None = Field(default=None, gt=0, le=1e6)
    target_delta: float = Field(default=1e-5, gt=0, lt=1)  # epsilon is reported at this delta
    # Stop training (no new rounds) before a round would take epsilon past this; None: never.
    epsilon_budget: float | None = Field(default=None, gt=0, le=1e6)
    accountant: Literal["rdp", "pld"] = "rdp"  # dp-accounting's RDP or PLD accountant

    @model_validator(mode="after")
    def _adaptive_is_central(self) -> PrivacyConfig:
        if self.target_quantile is not None and self.mode == "local":
            raise ValueError(
                'target_quantile (adaptive clip) needs mode = "central": under local DP the'
                " devices' clip bits would reach the aggregator without noise"
            )
        return self

    def count_noise(self, expected_devices: int) -> float:
        """The standard deviation of the noise on the bit count (adaptive clip)."""
        if self.count_stddev is not None:
            return self.count_stddev
        return COUNT_STDDEV_SHARE * max(1, expected_devices)

    def value_noise_multiplier(self, expected_devices: int) -> float:
        """The multiplier of the noise the aggregator adds to the sum of updates: ``z`` with
        a fixed clip, a little more with the adaptive one (see the module docstring)."""
        if self.target_quantile is None:
            return self.noise_multiplier
        return value_noise_multiplier(self.noise_multiplier, self.count_noise(expected_devices))


def value_noise_multiplier(z: float, count_stddev: float) -> float:
    """``(z^-2 - (2 count_stddev)^-2)^-1/2``: the update noise that, with the bit count's
    noise, spends what one Gaussian of multiplier ``z`` would (Andrew et al. 2021)."""
    if z >= 2 * count_stddev:
        raise ValueError(
            f"noise_multiplier {z:g} needs count_stddev above {z / 2:g} (it is"
            f" {count_stddev:g}): raise count_stddev or devices per round, or lower"
            " noise_multiplier"
        )
    return float((z**-2 - (2 * count_stddev) ** -2) ** -0.5)


def noised_mean(
    total: Weights, *, std: float, denominator: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """``(total + N(0, std^2)) / denominator`` per entry, in float64: central DP's mean of the
    clipped updates (``total`` is their unweighted sum)."""
    if denominator < 1:
        raise ValueError("the denominator must be at least 1")
    return {
        k: (np.asarray(v, np.float64) + rng.normal(0.0, std, np.shape(v))) / denominator
        for k, v in total.items()
    }


def unclipped_fraction(bits: Sequence[bool], *, std: float, rng: np.random.Generator) -> float:
    """The noised share of updates whose norm was within the clip, in [0, 1]: the bits
    centred at 1/2 (sensitivity 1/2), summed, plus N(0, std^2), over their number."""
    if not bits:
        return 0.5  # nothing to learn from: the clip stays where it is
    centred = sum(b - 0.5 for b in bits) + float(rng.normal(0.0, std))
    return min(1.0, max(0.0, centred / len(bits) + 0.5))


def next_clip(clip: float, fraction: float, *, target: float, lr: float) -> float:
    """The geometric update toward the target quantile: a clip that most norms are within
    shrinks, one that most exceed grows."""
    return float(clip * math.exp(-lr * (fraction - target)))

"""What ``fedge sim`` is asked to inject, parsed from its options (pure, no I/O).

Errors are ``FaultSpecError`` (a ``ValueError``) whose ``str()`` is one line naming the option.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np


class FaultSpecError(ValueError):
    """A fault option that cannot be understood; ``str()`` is one line."""


@dataclass(frozen=True)
class Latency:
    """A distribution of local training time, in seconds.

    ``lognormal:MEAN:SIGMA``: a log-normal with that mean (not median) and shape ``SIGMA``
    (the standard deviation of the log; 0 makes every draw ``MEAN``).
    ``exp:MEAN``: an exponential with that mean.
    """

    kind: Literal["lognormal", "exp"]
    mean: float
    sigma: float = 0.0

    def sample(self, rng: np.random.Generator) -> float:
        if self.kind == "exp":
            return float(rng.exponential(self.mean))
        # E[exp(N(mu, s^2))] = exp(mu + s^2 / 2): choose mu so that the mean is MEAN.
        mu = math.log(self.mean) - self.sigma**2 / 2
        return float(rng.lognormal(mu, self.sigma)) if self.sigma else self.mean

    def __str__(self) -> str:
        if self.kind == "exp":
            return f"exp:{self.mean:g}"
        return f"lognormal:{self.mean:g}:{self.sigma:g}"


@dataclass(frozen=True)
class Poison:
    """``devices`` devices send ``factor`` times their honest delta (-1: sign-flip)."""

    devices: int
    factor: float

    def __str__(self) -> str:
        mode = "sign-flip" if self.factor == -1 else f"scale:{self.factor:g}"
        return f"{self.devices}:{mode}"


@dataclass(frozen=True)
class FaultSettings:
    """Everything injected into one run; all off by default."""

    drop_rate: float = 0.0  # per selected device per round: it trains, its answer never arrives
    stragglers: Latency | None = None  # added training time; past the deadline: a dropout
    link_flaps: float = 0.0  # per device per round: its TCP connection is cut once
    broker_restarts: int = 0  # restarts of the sim's own Mosquitto during the run
    poison: Poison | None = None
    hung: int = 0  # devices that stay connected and online and never answer (a hung process)
    seed: int = 0

    @property
    def active(self) -> bool:
        return bool(
            self.drop_rate
            or self.stragglers
            or self.link_flaps
            or self.broker_restarts
            or self.poison
            or self.hung
        )

    def describe(self) -> dict[str, object]:
        return {
            "drop_rate": self.drop_rate,
            "stragglers": None if self.stragglers is None else str(self.stragglers),
            "link_flaps": self.link_flaps,
            "broker_restarts": self.broker_restarts,
            "poison": None if self.poison is None else str(self.poison),
            "hung": self.hung,
            "seed": self.seed,
        }


_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)(?:[eE]([-+]?\d+))?"


def _number(text: str, option: str, what: str) -> float:
    if not re.fullmatch(_NUMBER, text):
        raise FaultSpecError(f"{option}: {what} must be a number, not {text!r}")
    return float(text)


def parse_probability(value: float, option: str) -> float:
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise FaultSpecError(f"{option} must be between 0 and 1, not {value:g}")
    return value


def parse_stragglers(text: str) -> Latency:
    """``lognormal:MEAN_S:SIGMA`` or ``exp:MEAN_S`` (MEAN_S > 0, SIGMA >= 0)."""
    kind, _, rest = text.partition(":")
    parts = rest.split(":") if rest else []
    want = {"lognormal": 2, "exp": 1}
    if kind not in want or len(parts) != want[kind]:
        raise FaultSpecError(f"--stragglers {text!r}: want lognormal:MEAN_S:SIGMA or exp:MEAN_S")
    mean = _number(parts[0], "--stragglers", "the mean")
    if mean <= 0:
        raise FaultSpecError(f"--stragglers {text!r}: the mean must be above 0 seconds")
    if kind == "exp":
        return Latency("exp", mean)
    sigma = _number(parts[1], "--stragglers", "sigma")
    if sigma > 5:
        raise FaultSpecError(f"--stragglers {text!r}: sigma above 5 makes no sense here")
    return Latency("lognormal", mean, sigma)


def parse_poison(text: str, devices: int) -> Poison:
    """``K:sign-flip`` or ``K:scale:F`` with 1 <= K <= devices."""
    count, _, mode = text.partition(":")
    if not count.isdigit() or not mode:
        raise FaultSpecError(f"--poison {text!r}: want K:sign-flip or K:scale:F")
    k = int(count)
    if not 1 <= k <= devices:
        raise FaultSpecError(f"--poison {text!r}: K must be between 1 and {devices} devices")
    if mode == "sign-flip":
        return Poison(k, -1.0)
    kind, _, factor = mode.partition(":")
    if kind != "scale" or not factor:
        raise FaultSpecError(f"--poison {text!r}: want K:sign-flip or K:scale:F")
    sign = -1.0 if factor.startswith("-") else 1.0
    value = sign * _number(factor.lstrip("-"), "--poison", "the scale")
    if value == 1.0 or value == 0.0 or abs(value) > 1e6:
        raise FaultSpecError(f"--poison {text!r}: the scale must differ from 0 and 1, |F| <= 1e6")
    return Poison(k, value)


def fault_settings(
    *,
    drop_rate: float = 0.0,
    stragglers: str | None = None,
    link_flaps: float = 0.0,
    broker_restarts: int = 0,
    poison: str | None = None,
    hung: int = 0,
    devices: int,
    seed: int = 0,
) -> FaultSettings:
    """The settings the sim's options describe, or ``FaultSpecError``."""
    if broker_restarts < 0:
        raise FaultSpecError(f"--broker-restarts must be 0 or more, not {broker_restarts}")
    if not 0 <= hung <= devices:
        raise FaultSpecError(f"--hung must be between 0 and {devices} devices, not {hung}")
    return FaultSettings(
        drop_rate=parse_probability(drop_rate, "--drop-rate"),
        stragglers=parse_stragglers(stragglers) if stragglers else None,
        link_flaps=parse_probability(link_flaps, "--link-flaps"),
        broker_restarts=broker_restarts,
        poison=parse_poison(poison, devices) if poison else None,
        hung=hung,
        seed=seed,
    )

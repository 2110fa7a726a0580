"""How a round's deltas become one delta: the sample-weighted mean or a robust replacement.

Pure numpy. Every server optimiser applies what its combiner returns (the mean delta of
FedAvg, FedAvgM's momentum input, FedAdam's pseudo-gradient), so any optimiser works with any
combiner. The settings, in the ``[strategy]`` table of the aggregator config::

    robust = "mean"        # or "median", "trimmed_mean"
    trim_fraction = 0.2    # trimmed_mean: share of the weight cut at EACH end, 0 <= x < 0.5
    norm_bound = 0.0       # 0: off; > 0: cap each delta's L2 norm (below)

**Norm bounding** comes first, with any combiner: a delta whose L2 norm (over all its
tensors) is above ``norm_bound`` x the median norm of the round's deltas is scaled down to
that norm, so a device cannot buy influence with size. It is relative to the round, so it
needs no tuning to the model's scale. The median is the lower median of the norms of the
non-zero deltas (a skip notice's zero delta is not a vote; with two devices, one liar, the
honest norm is the median).

**How sample counts enter.** The mean weighs each delta by its device's (bounded, see
``[samples]``) sample count, as FedAvg does. The median and the trimmed mean weigh them the same
way, per coordinate: the weighted median is the value with at most half of the weight below
it and at most half above (the midpoint of the two middle values on an exact tie, so equal
counts give ``np.median``); the trimmed mean cuts ``trim_fraction`` of the weight at each
end of the sorted values (a device's weight may be cut in part) and averages what is left.
They resist devices that hold less than half (median) or less than ``trim_fraction``
(trimmed mean) of a coordinate's weight; a liar's count is at most ``median_factor`` times
the round's median count.

**How sparsity enters.** Updates arrive decoded as dense arrays, with zeros where a device
sent nothing (top-k keeps about 2% of the entries and never sends an exact zero), and a
device that skipped the upload is a zero delta with its samples. A median over all devices
would then be zero almost everywhere and the model would stop learning. So a coordinate's
median or trimmed mean is taken over the devices that sent it (a non-zero value, the test
the lazy FedAdam uses too) and multiplied by their share of the round's weight::

    combined[j] = estimate_{i sent j}(d_ij; n_i) * sum_{i sent j} n_i / sum_i n_i

For the mean this identity is exact (the mean with absent entries as zeros), so the robust
estimates have the mean's scale under top-k and skips; with every coordinate sent they are
the plain weighted median and trimmed mean. A coordinate nobody sent stays 0. An int8 value
that rounds to 0, or an exact 0 in a dense upload, counts as not sent.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from .base import Weights

log = logging.getLogger("fedge.aggregator")

Robust = Literal["mean", "median", "trimmed_mean"]
ROBUST: tuple[Robust, ...] = get_args(Robust)

# Coordinates sorted at once: bounds the (devices x block) float64 scratch arrays.
_BLOCK = 1 << 16


def weighted_mean(deltas: Sequence[Weights], counts: Sequence[int]) -> dict[str, np.ndarray]:
    """``sum_i n_i * delta_i / sum_i n_i`` per tensor, in float64."""
    n = _weights(deltas, counts)
    total = float(n.sum())
    out: dict[str, np.ndarray] = {}
    for name in deltas[0]:
        acc = np.zeros(np.shape(deltas[0][name]), dtype=np.float64)
        for delta, w in zip(deltas, n, strict=True):
            acc += np.asarray(delta[name], dtype=np.float64) * (w / total)
        out[name] = acc
    return out


def weighted_median(deltas: Sequence[Weights], counts: Sequence[int]) -> dict[str, np.ndarray]:
    """Coordinate-wise weighted median over the devices that sent each coordinate."""
    return _coordinatewise(deltas, counts, _median)


def trimmed_mean(
    deltas: Sequence[Weights], counts: Sequence[int], trim_fraction: float
) -> dict[str, np.ndarray]:
    """Coordinate-wise weighted mean after cutting ``trim_fraction`` of the weight at each end."""
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), not {trim_fraction}")
    return _coordinatewise(deltas, counts, lambda v, w, share: _trimmed(v, w, share, trim_fraction))


def delta_norm(delta: Weights) -> float:
    """The L2 norm of a delta over all its tensors."""
    return math.sqrt(
        sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in delta.values())
    )


@dataclass(frozen=True)
class NormBounded:
    deltas: list[Weights]  # the round's deltas, those over the cap scaled down to it
    cap: float  # norm_bound x the median norm; 0 when every delta is zero
    scaled: int  # how many deltas were over the cap


def bound_norms(deltas: Sequence[Weights], norm_bound: float) -> NormBounded:
    """Cap each delta's L2 norm at ``norm_bound`` x the lower median of the non-zero norms.

    Deltas under the cap are returned as they are (the same objects).
    """
    if not (math.isfinite(norm_bound) and norm_bound > 0):
        raise ValueError(f"norm_bound must be finite and > 0, not {norm_bound}")
    norms = [delta_norm(d) for d in deltas]
    nonzero = [x for x in norms if x > 0]
    if not nonzero:
        return NormBounded(list(deltas), 0.0, 0)
    cap = norm_bound * statistics.median_low(nonzero)
    out: list[Weights] = []
    for delta, norm in zip(deltas, norms, strict=True):
        if norm <= cap:
            out.append(delta)
        else:
            out.append({k: np.asarray(x, np.float64) * (cap / norm) for k, x in delta.items()})
    return NormBounded(out, cap, sum(1 for x in norms if x > cap))


@dataclass(frozen=True)
class RobustCombiner:
    """The combiner the ``[strategy]`` settings name (see the module doc); a :class:`Combiner`."""

    robust: Robust = "mean"
    trim_fraction: float = 0.2
    norm_bound: float = 0.0

    def __post_init__(self) -> None:
        if self.robust not in ROBUST:
            raise ValueError(f"robust must be one of {', '.join(ROBUST)}, not {self.robust!r}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), not {self.trim_fraction}")
        if not (math.isfinite(self.norm_bound) and self.norm_bound >= 0):
            raise ValueError(f"norm_bound must be finite and >= 0, not {self.norm_bound}")

    def __call__(self, deltas: Sequence[Weights], counts: Sequence[int]) -> dict[str, np.ndarray]:
        _weights(deltas, counts)  # reject bad input before bounding
        if self.norm_bound > 0:
            bounded = bound_norms(deltas, self.norm_bound)
            if bounded.scaled:
                log.info(
                    "norm bound: scaled %d of %d deltas down to norm %.3g (%g x the median)",
                    bounded.scaled,
                    len(deltas),
                    bounded.cap,
                    self.norm_bound,
                )
            deltas = bounded.deltas
        if self.robust == "median":
            return weighted_median(deltas, counts)
        if self.robust == "trimmed_mean":
            return trimmed_mean(deltas, counts, self.trim_fraction)
        return weighted_mean(deltas, counts)

    @property
    def needs_all_deltas(self) -> bool:
        """Whether combining needs every delta at once (the plain mean is a running sum)."""
        return self.robust != "mean" or self.norm_bound > 0

    def describe(self) -> str:
        how = {"mean": "mean", "median": "median"}.get(
            self.robust, f"trimmed_mean(trim_fraction={self.trim_fraction:g})"
        )
        return how if self.norm_bound == 0 else f"{how}, norm_bound={self.norm_bound:g}"


MEAN = RobustCombiner()  # FedAvg's sample-weighted mean, no bounding: every strategy's default


def _weights(deltas: Sequence[Weights], counts: Sequence[int]) -> np.ndarray:
    if not deltas or len(deltas) != len(counts):
        raise ValueError("need one sample count per delta, and at least one delta")
    n = np.asarray(counts, dtype=np.float64)
    if not np.all(np.isfinite(n)) or np.any(n < 0):
        raise ValueError("sample counts must be finite and not negative")
    if float(n.sum()) <= 0:
        raise ValueError("sample counts must add up to more than zero")
    return n


# estimate(values, weights, share) per column: values sorted ascending down axis 0, their
# weights (0 where the device did not send the coordinate), and each column's total weight.
Estimate = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _coordinatewise(
    deltas: Sequence[Weights], counts: Sequence[int], estimate: Estimate
) -> dict[str, np.ndarray]:
    n = _weights(deltas, counts)
    total = float(n.sum())
    out: dict[str, np.ndarray] = {}
    for name in deltas[0]:
        shape = np.shape(deltas[0][name])
        stack = np.stack([np.ravel(np.asarray(d[name])) for d in deltas])  # devices x entries
        sent = stack != 0
        cols = np.flatnonzero(n @ sent > 0)  # someone with weight sent it
        flat = np.zeros(stack.shape[1], np.float64)
        for start in range(0, cols.size, _BLOCK):
            block = cols[start : start + _BLOCK]
            values = stack[:, block].astype(np.float64)
            weights = np.where(sent[:, block], n[:, None], 0.0)
            order = np.argsort(values, axis=0, kind="stable")
            values = np.take_along_axis(values, order, axis=0)
            weights = np.take_along_axis(weights, order, axis=0)
            share = weights.sum(axis=0)
            flat[block] = estimate(values, weights, share) * (share / total)
        out[name] = flat.reshape(shape)
    return out


def _median(values: np.ndarray, weights: np.ndarray, share: np.ndarray) -> np.ndarray:
    # The first value whose cumulative weight reaches half, and the first that passes it: the
    # same value unless the weight splits exactly in two. Both have weight > 0, since the
    # cumulative weight grows there; sums of integer counts are exact in float64.
    cum = np.cumsum(weights, axis=0)
    half = share / 2
    lo = np.argmax(cum >= half, axis=0)
    hi = np.argmax(cum > half, axis=0)
    cols = np.arange(values.shape[1])
    result: np.ndarray = (values[lo, cols] + values[hi, cols]) / 2
    return result


def _trimmed(
    values: np.ndarray, weights: np.ndarray, share: np.ndarray, fraction: float
) -> np.ndarray:
    # Each value covers [cum - w, cum] of the column's weight; keep its overlap with the band
    # [fraction * share, (1 - fraction) * share] and average with the overlaps as weights.
    upper = np.cumsum(weights, axis=0)
    lower = upper - weights
    lo = fraction * share
    hi = share - lo
    kept = np.clip(np.minimum(upper, hi) - np.maximum(lower, lo), 0.0, None)
    result: np.ndarray = (values * kept).sum(axis=0) / (hi - lo)
    return result

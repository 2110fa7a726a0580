"""Partitioners: which training samples each simulated device holds (pure functions).

Every partitioner takes the training labels ``y``, a device count and a numpy
``Generator`` (the only source of randomness, so a seed fixes the partition) and
returns one sorted array of sample indices per device. The parts are always
disjoint. ``iid``, ``single`` and ``dirichlet`` cover every sample exactly once;
``dominant`` may leave samples out (see its docstring).

The classes are the distinct values of ``y`` in sorted order (for labels
``0..K-1`` that are all present, class ``k`` is label ``k``).

Schemes as text (``fedge sim --partition``), parsed by :func:`parse_scheme`:

=================  ===============================================================
``iid``            shuffle and deal out evenly
``single``         each device holds one class only (class ``i mod K``)
``dominant:P``     a fraction P of device i's samples are of class ``i mod K``,
                   the rest spread evenly over the other classes; sizes differ
``dirichlet:A``    per class, device shares drawn from Dirichlet(A) (Hsu et al. 2019)
=================  ===============================================================

All errors are ``ValueError`` with a one-line message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

#: Fewest samples a device gets from ``dominant`` and ``dirichlet`` (by default).
MIN_SAMPLES = 10
#: Spread of ``dominant`` device sizes: relative sizes are lognormal(0, SIZE_SIGMA).
SIZE_SIGMA = 0.5
#: How many times ``dirichlet`` re-draws before giving up on ``min_samples``.
DIRICHLET_TRIES = 100

KNOWN = "iid, single, dominant:P (0 < P <= 1), dirichlet:ALPHA (ALPHA > 0)"
_TAKES_PARAM = {"iid": False, "single": False, "dominant": True, "dirichlet": True}


@dataclass(frozen=True)
class Scheme:
    """A validated partition scheme: ``kind`` and its parameter (``None`` for iid/single)."""

    kind: str
    param: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in _TAKES_PARAM:
            raise ValueError(f"unknown partition scheme {self.kind!r} (known: {KNOWN})")
        if not _TAKES_PARAM[self.kind]:
            if self.param is not None:
                raise ValueError(f"partition scheme {self.kind!r} takes no parameter")
            return
        p = self.param
        if p is None or not math.isfinite(p):
            raise ValueError(f"partition scheme {self.kind!r} needs a finite parameter, got {p}")
        if self.kind == "dominant" and not 0.0 < p <= 1.0:
            raise ValueError(f"dominant:P needs 0 < P <= 1, got {p:g}")
        if self.kind == "dirichlet" and not p > 0.0:
            raise ValueError(f"dirichlet:ALPHA needs ALPHA > 0, got {p:g}")

    def __str__(self) -> str:
        return self.kind if self.param is None else f"{self.kind}:{self.param:g}"

    @property
    def slug(self) -> str:
        """The scheme as a folder name: ``iid``, ``dominant-0.9``, ``dirichlet-0.1``."""
        return self.kind if self.param is None else f"{self.kind}-{self.param:g}"


def parse_scheme(text: str) -> Scheme:
    """``"dominant:0.9"`` -> ``Scheme("dominant", 0.9)``; ValueError naming the known schemes."""
    kind, sep, arg = text.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in _TAKES_PARAM:
        raise ValueError(f"unknown partition scheme {text!r} (known: {KNOWN})")
    if not sep:
        if _TAKES_PARAM[kind]:
            raise ValueError(f"partition scheme {text!r} needs a parameter (known: {KNOWN})")
        return Scheme(kind)
    if not _TAKES_PARAM[kind]:
        raise ValueError(f"partition scheme {text!r}: {kind} takes no parameter (known: {KNOWN})")
    try:
        value = float(arg)
    except ValueError:
        raise ValueError(
            f"partition scheme {text!r}: {arg.strip()!r} is not a number (known: {KNOWN})"
        ) from None
    try:
        return Scheme(kind, value)
    except ValueError as exc:
        raise ValueError(f"partition scheme {text!r}: {exc} (known: {KNOWN})") from None


def partition(
    scheme: str | Scheme, y: np.ndarray, devices: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Split the samples labelled ``y`` over ``devices`` by ``scheme`` (text or Scheme)."""
    s = parse_scheme(scheme) if isinstance(scheme, str) else scheme
    if s.kind == "iid":
        return iid(y, devices, rng)
    if s.kind == "single":
        return single(y, devices, rng)
    assert s.param is not None  # Scheme validated it
    if s.kind == "dominant":
        return dominant(y, devices, rng, s.param)
    return dirichlet(y, devices, rng, s.param)


def label_shares(y: np.ndarray, parts: list[np.ndarray], n_classes: int) -> np.ndarray:
    """Devices x classes matrix: the fraction of each device's samples with label k.

    ``y`` holds labels ``0..n_classes-1``. Rows sum to 1 (an empty device's row is 0).
    """
    out = np.zeros((len(parts), n_classes))
    for i, part in enumerate(parts):
        if len(part):
            out[i] = np.bincount(y[part], minlength=n_classes)[:n_classes] / len(part)
    return out


def iid(y: np.ndarray, devices: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and deal out: every device gets about len(y)/devices samples, labels as a whole."""
    if devices < 1 or devices > len(y):
        raise ValueError(f"cannot split {len(y)} samples over {devices} devices")
    return [np.sort(part) for part in np.array_split(rng.permutation(len(y)), devices)]


def single(y: np.ndarray, devices: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Each device holds one class only: device i gets class ``i mod K``.

    A class held by several devices (when devices > K) is shuffled and dealt out
    evenly among them. Covers every sample exactly once. Refuses (ValueError) when
    devices < K, since some class would then belong to no device, and when a class
    has fewer samples than the devices that hold it.
    """
    classes, y_idx = np.unique(y, return_inverse=True)
    k = len(classes)
    if devices < max(k, 1):
        raise ValueError(
            f"single needs at least one device per class: {devices} devices, {k} classes"
        )
    parts: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * devices
    for c in range(k):
        holders = list(range(c, devices, k))
        members = np.flatnonzero(y_idx == c)
        if len(members) < len(holders):
            raise ValueError(
                f"single: class {classes[c]!r} has {len(members)} samples "
                f"for {len(holders)} devices"
            )
        for dev, chunk in zip(
            holders, np.array_split(rng.permutation(members), len(holders)), strict=True
        ):
            parts[dev] = np.sort(chunk)
    return parts


def dirichlet(
    y: np.ndarray,
    devices: int,
    rng: np.random.Generator,
    alpha: float,
    *,
    min_samples: int = MIN_SAMPLES,
) -> list[np.ndarray]:
    """Label skew after Hsu et al. (2019): per class, device shares ~ Dirichlet(alpha).

    For each class, draw shares p ~ Dir(alpha, ..., alpha) over the devices, shuffle
    the class's samples and cut them at the cumulative shares. Small alpha (0.1):
    each device holds a few classes; large alpha (100): close to iid. Device sizes
    differ as a consequence. Covers every sample exactly once. If some device ends
    up with fewer than ``min_samples``, everything is re-drawn, up to
    ``DIRICHLET_TRIES`` times; then ValueError.
    """
    if not alpha > 0:
        raise ValueError(f"dirichlet needs alpha > 0, got {alpha}")
    if devices < 1 or devices * min_samples > len(y):
        raise ValueError(
            f"cannot split {len(y)} samples over {devices} devices with at least {min_samples} each"
        )
    _, y_idx = np.unique(y, return_inverse=True)
    members = [np.flatnonzero(y_idx == c) for c in range(int(y_idx.max(initial=-1)) + 1)]
    for _ in range(DIRICHLET_TRIES):
        chunks: list[list[np.ndarray]] = [[] for _ in range(devices)]
        for idx in members:
            shares = rng.dirichlet(np.full(devices, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for dev, chunk in enumerate(np.split(rng.permutation(idx), cuts)):
                chunks[dev].append(chunk)
        parts = [np.sort(np.concatenate(c)) if c else np.empty(0, np.int64) for c in chunks]
        if min(len(p) for p in parts) >= min_samples:
            return parts
    raise ValueError(
        f"dirichlet:{alpha:g} gave some of {devices} devices fewer than {min_samples} samples "
        f"in {DIRICHLET_TRIES} draws; use a larger alpha or fewer devices"
    )


def dominant(
    y: np.ndarray,
    devices: int,
    rng: np.random.Generator,
    p: float,
    *,
    min_samples: int = MIN_SAMPLES,
    size_sigma: float = SIZE_SIGMA,
) -> list[np.ndarray]:
    """Device i's dominant class is ``i mod K``: a fraction p of its samples, the rest even.

    Sizes: relative device sizes w_i are a lognormal(0, size_sigma) sample drawn one
    per equal-probability stratum, in random order (so with sigma 0.5 and 10
    devices the largest w is at least 3.6 times the smallest, whatever the seed).
    Targets start at ``w_i / sum(w) * len(y)``, at least ``min_samples``. Targets
    that ask a class for more samples than it has are shrunk: each device by the
    overload of its own dominant class, repeated until every class suffices,
    never below ``min_samples``. So large devices are capped near what their
    dominant class can give, small ones keep their drawn size, and samples no
    device asked for are left out.

    Guaranteed:

    - the parts are disjoint, but need not cover ``y`` (digits, 10 devices,
      dominant:0.9: 900-1,175 of the 1,400 training samples are used, median
      about 1,140; device sizes from 20-60 up to about 145);
    - every device holds at least ``min_samples`` (ValueError if
      ``len(y) < devices * min_samples``);
    - a device of size s holds ``p * s`` samples of its dominant class and
      ``(1 - p) * s / (K - 1)`` of each other class, each rounded to a whole
      sample (so its dominant share is within about ``1 / s`` of p), unless a
      class is too small for its devices even at ``min_samples`` each.

    Degrading: such a class goes to the devices it is dominant for only, divided
    in proportion to what they asked, and every device's shortfall is filled from
    the classes with the most samples to spare. So sizes are kept and the
    dominant share of those devices falls to about ``p * available / asked``;
    other devices lose their (small) share of that class.
    Needs at least two classes.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"dominant needs 0 < p <= 1, got {p}")
    n = len(y)
    if devices < 1 or devices * min_samples > n:
        raise ValueError(
            f"cannot split {n} samples over {devices} devices with at least {min_samples} each"
        )
    classes, y_idx = np.unique(y, return_inverse=True)
    k = len(classes)
    if k < 2:
        raise ValueError(f"dominant needs at least 2 classes, got {k}")
    counts = np.bincount(y_idx, minlength=k)
    dom = np.arange(devices) % k
    share = np.full((devices, k), (1.0 - p) / (k - 1))
    share[np.arange(devices), dom] = p

    sizes = np.maximum(_stratified_lognormal(devices, size_sigma, rng) * n, min_samples)
    for _ in range(1000):
        over = (sizes @ share) / counts
        if over.max() <= 1.0 + 1e-9:
            break
        shrink = np.maximum(over[dom], 1.0)
        if np.all(shrink == 1.0):  # only background demand overloads: shrink everyone
            shrink[:] = over.max()
        new = np.maximum(sizes / shrink, min_samples)
        if np.allclose(new, sizes, rtol=0, atol=1e-9):
            break  # every overloaded device is at min_samples: shares will degrade
        sizes = new
    whole = np.floor(sizes + 1e-9).astype(int)
    if whole.sum() > n:  # floors pushed the total past the data: trim what is above the floor
        extra = whole - min_samples
        room = n - devices * min_samples
        whole = min_samples + np.floor(extra * room / extra.sum()).astype(int)

    # Rounding may ask a class for a few samples more than it has: _fill settles that.
    # Ties (the equal background cells) are broken at random, not always to class 0.
    asks = np.array([_apportion(share[i], int(whole[i]), rng.random(k)) for i in range(devices)])
    take = _fill(asks, whole, counts, dom)
    members = [rng.permutation(np.flatnonzero(y_idx == c)) for c in range(k)]
    parts: list[list[np.ndarray]] = [[] for _ in range(devices)]
    for c in range(k):
        cuts = np.cumsum(take[:, c])
        for dev, chunk in enumerate(np.split(members[c][: cuts[-1]], cuts[:-1])):
            parts[dev].append(chunk)
    return [np.sort(np.concatenate(chunks)) for chunks in parts]


def _stratified_lognormal(devices: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Proportions (summing to 1) from a lognormal(0, sigma) sample, one draw per stratum.

    Draw j comes from the j-th of ``devices`` equal-probability slices of the normal
    (Latin hypercube), in random order: the spread never comes out small by chance.
    """
    normal = NormalDist()
    u = (rng.permutation(devices) + rng.uniform(0.0, 1.0, devices)) / devices
    u = np.clip(u, 1e-12, 1.0 - 1e-12)
    w = np.exp(sigma * np.array([normal.inv_cdf(float(q)) for q in u]))
    return np.asarray(w / w.sum())


def _fill(take: np.ndarray, sizes: np.ndarray, supply: np.ndarray, dom: np.ndarray) -> np.ndarray:
    """Cut ``take`` (devices x classes) to each class's supply, then top rows up to ``sizes``.

    An over-asked class first cuts what the devices it is not dominant for ask
    (in proportion); if that is not enough, it goes to its own devices only, in
    proportion to their asks. Each device's shortfall is then taken from the
    classes with the most samples to spare, its dominant class last. Rows reach
    ``sizes`` whenever ``sizes.sum() <= supply.sum()``.
    """
    take = take.copy()
    for c in range(take.shape[1]):
        excess = int(take[:, c].sum() - supply[c])
        if excess <= 0:
            continue
        mine = dom == c
        background = np.where(mine, 0, take[:, c])
        if excess < background.sum():  # round-off: other devices ask a little less
            take[:, c] = np.where(
                mine, take[:, c], _apportion(background, background.sum() - excess)
            )
        else:  # scarce: the class goes to its own devices, in proportion to their asks
            take[:, c] = _apportion(np.where(mine, take[:, c], 0), int(supply[c]))
    spare = supply - take.sum(axis=0)
    for i in range(len(take)):
        short = int(sizes[i] - take[i].sum())
        while short > 0 and spare.sum() > 0:
            avail = spare.copy()
            if avail.sum() > avail[dom[i]]:
                avail[dom[i]] = 0
            give = np.minimum(_apportion(avail / avail.sum(), short), avail)
            if give.sum() == 0:
                give[np.argmax(avail)] = 1
            take[i] += give
            spare -= give
            short -= int(give.sum())
    return take


def _apportion(weights: np.ndarray, total: int, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """``total`` whole units in proportion to ``weights`` (largest remainders).

    Equal remainders go to the larger ``tiebreak`` first (default: the lower index).
    """
    real = weights / weights.sum() * total
    out = np.floor(real).astype(int)
    rem = np.round(real - out, 9)  # so that equal shares compare equal despite float noise
    key = np.zeros(len(real)) if tiebreak is None else -tiebreak
    order = np.lexsort((key, -rem))
    out[order[: total - int(out.sum())]] += 1
    return out

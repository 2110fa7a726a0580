"""A round's accepted updates, folded in as they arrive (pure numpy, no I/O).

With the plain sample-weighted mean (every strategy's default), the aggregator holds one
running sum per round, ``sum_i n_i * delta_i`` in float64, and ``sum_i n_i``: memory is
O(model) however many devices answer, and each update is folded in when it is accepted. The
robust combiners (median, trimmed mean, a norm bound relative to the round's median norm) need
every delta at the end; for them the deltas are kept (O(devices x model), by their nature).

The weight of an update is its declared sample count until the round closes; then counts over
their caps (``aggregator/sample_limits.py``: 3x the round's median, per-device caps) are known
and their difference is folded in again: ``(used - declared) * delta``. Those few deltas come
back from the state store, where every accepted update is kept for a restart anyway; a device
that trained and held its update back adds its weight with a zero delta.

    acc = make_accumulator(template, keep_deltas=False)
    acc.add("pi-1", delta, 120); acc.hold("pi-2", 80)
    combined = acc.mean(used={"pi-1": 120, "pi-2": 80}, fetch=store_delta)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from .strategies.base import Combiner

Weights = Mapping[str, np.ndarray]


class RoundAnswers:
    """Who is in the round and with which declared weight: what every accumulator keeps."""

    def __init__(self) -> None:
        self.declared: dict[str, int] = {}  # device -> the weight it came in with
        self.uploaded: set[str] = set()  # devices whose delta is in (not held back)

    def _enter(self, device: str, n: int, *, uploaded: bool) -> None:
        if device in self.declared:
            raise ValueError(f"{device} is already in the round")
        self.declared[device] = n
        if uploaded:
            self.uploaded.add(device)

    def hold(self, device: str, n: int) -> None:
        """A device that trained and held its update back: its weight, with a zero delta."""
        self._enter(device, n, uploaded=False)

    def _check_final(self, used: Mapping[str, int]) -> None:
        if set(used) != set(self.declared):
            raise ValueError("need the final weight of exactly the devices in the round")


class RunningSum(RoundAnswers):
    """``sum n_i delta_i`` and the declared weights, O(model) memory."""

    keeps_deltas = False

    def __init__(self, template: Weights) -> None:
        super().__init__()
        self._acc = {k: np.zeros(np.shape(w), np.float64) for k, w in template.items()}

    def add(self, device: str, delta: Weights, n: int) -> None:
        """Fold in one accepted update with its declared sample count."""
        self._enter(device, n, uploaded=True)
        for name, acc in self._acc.items():
            acc += float(n) * np.asarray(delta[name], np.float64)

    def mean(
        self, used: Mapping[str, int], fetch: Callable[[str], Weights], combiner: Combiner
    ) -> dict[str, np.ndarray]:
        """``sum used_i delta_i / sum used_i`` over the devices in the round (float64).

        ``used`` gives each device's final weight; a device whose weight differs from the one
        it was folded in with has its delta ``fetch``-ed and folded in again with the
        difference (held devices have none to fetch).
        """
        total = float(sum(used.values()))
        if total <= 0:
            raise ValueError("sample counts must add up to more than zero")
        out = self.weighted_sum(used, fetch)
        for acc in out.values():
            acc /= total
        return out

    def weighted_sum(
        self, used: Mapping[str, int], fetch: Callable[[str], Weights]
    ) -> dict[str, np.ndarray]:
        """``sum used_i delta_i`` (float64), not yet divided: what a shard worker sends."""
        self._check_final(used)
        out = {k: a.copy() for k, a in self._acc.items()}
        for device, n in used.items():
            change = n - self.declared[device]
            if change and device in self.uploaded:
                delta = fetch(device)
                for name, acc in out.items():
                    acc += float(change) * np.asarray(delta[name], np.float64)
        return out


class DeltaList(RoundAnswers):
    """Every delta of the round, for a combiner that needs them all (a robust one)."""

    keeps_deltas = True

    def __init__(self, template: Weights) -> None:
        super().__init__()
        self._zeros = {k: np.zeros(np.shape(w), np.float32) for k, w in template.items()}
        self.deltas: dict[str, Weights] = {}

    def add(self, device: str, delta: Weights, n: int) -> None:
        self._enter(device, n, uploaded=True)
        self.deltas[device] = delta

    def hold(self, device: str, n: int) -> None:
        super().hold(device, n)
        self.deltas[device] = self._zeros

    def mean(
        self, used: Mapping[str, int], fetch: Callable[[str], Weights], combiner: Combiner
    ) -> dict[str, np.ndarray]:
        """What ``combiner`` makes of the deltas with their final weights (``fetch`` unused)."""
        self._check_final(used)
        # Uploads first, then the held zeros: the order the combiners were written for.
        order = sorted(self.uploaded) + sorted(set(self.declared) - self.uploaded)
        return combiner([self.deltas[d] for d in order], [used[d] for d in order])


Accumulator = RunningSum | DeltaList


def make_accumulator(template: Weights, *, keep_deltas: bool) -> Accumulator:
    """A running sum, or the list of deltas when the combiner needs them all."""
    return DeltaList(template) if keep_deltas else RunningSum(template)

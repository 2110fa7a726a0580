"""The running sum is the list-based weighted mean, and it keeps no delta."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
from fedge.aggregator.accumulate import DeltaList, RunningSum, make_accumulator
from fedge.aggregator.strategies.robust import MEAN, RobustCombiner, weighted_mean

pytestmark = pytest.mark.unit
SHAPES = {"kernel": (64, 32), "bias": (32,)}


def deltas(n: int, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        f"d{i}": {k: rng.normal(0, 1, s).astype(np.float32) for k, s in SHAPES.items()}
        for i in range(n)
    }


TEMPLATE = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}


def test_the_running_sum_is_the_weighted_mean_with_clipped_and_held_devices() -> None:
    ups = deltas(30)
    rng = np.random.default_rng(1)
    declared = {d: int(rng.integers(20, 200)) for d in ups}
    acc = RunningSum(TEMPLATE)
    for d, delta in ups.items():
        acc.add(d, delta, declared[d])
    acc.hold("h1", 150)  # trained, held its update back: a zero delta with its weight
    # At the close, two counts were clipped (over 3x the median, or a device cap).
    used = dict(declared) | {"d3": 7, "d17": 1, "h1": 90}
    fetched: list[str] = []

    def fetch(device: str) -> dict[str, np.ndarray]:
        fetched.append(device)
        return ups[device]

    got = acc.mean(used, fetch, MEAN)
    zeros = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    order = sorted(ups)
    want = weighted_mean([ups[d] for d in order] + [zeros], [used[d] for d in order] + [90])
    for name in SHAPES:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-12)
        assert got[name].dtype == np.float64
    assert sorted(fetched) == ["d17", "d3"]  # only what changed weight comes back
    again = acc.mean(used, fetch, MEAN)  # closing twice (a failed round) gives the same
    np.testing.assert_array_equal(again["kernel"], got["kernel"])


def test_no_delta_is_kept() -> None:
    acc = RunningSum(TEMPLATE)
    refs = []
    for d, delta in deltas(5).items():
        refs.append(weakref.ref(delta["kernel"]))
        acc.add(d, delta, 10)
    del delta
    gc.collect()
    assert all(r() is None for r in refs)  # memory is the model's, not devices x model


def test_a_device_folds_in_once_and_the_final_weights_must_match() -> None:
    acc = RunningSum(TEMPLATE)
    acc.add("a", deltas(1)["d0"], 5)
    with pytest.raises(ValueError, match="already in the round"):
        acc.add("a", deltas(1)["d0"], 5)
    with pytest.raises(ValueError, match="already in the round"):
        acc.hold("a", 5)
    with pytest.raises(ValueError, match="exactly the devices"):
        acc.mean({"a": 5, "b": 1}, lambda d: {}, MEAN)
    with pytest.raises(ValueError, match="more than zero"):
        acc.mean({"a": 0}, lambda d: deltas(1)["d0"], MEAN)


def test_a_robust_combiner_gets_every_delta_with_the_final_weights() -> None:
    median = RobustCombiner(robust="median")
    assert median.needs_all_deltas and RobustCombiner(norm_bound=3).needs_all_deltas
    assert not MEAN.needs_all_deltas
    assert isinstance(make_accumulator(TEMPLATE, keep_deltas=True), DeltaList)
    assert isinstance(make_accumulator(TEMPLATE, keep_deltas=False), RunningSum)
    ups = deltas(7, seed=3)
    acc = DeltaList(TEMPLATE)
    for d, delta in ups.items():
        acc.add(d, delta, 10)
    acc.hold("h", 10)
    used = {d: 10 for d in ups} | {"d2": 4, "h": 10}
    got = acc.mean(used, lambda d: pytest.fail("a list needs nothing fetched"), median)
    zeros = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    order = sorted(ups)
    want = median([ups[d] for d in order] + [zeros], [used[d] for d in order] + [10])
    for name in SHAPES:
        np.testing.assert_array_equal(got[name], want[name])

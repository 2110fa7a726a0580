"""Laws of federated averaging."""

from __future__ import annotations

import numpy as np
import pytest
from fedge.aggregator.strategies.fedavg import FedAvg
from fedge.aggregator.strategies.robust import weighted_mean
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.unit


def _tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "k": rng.normal(size=(3, 4)).astype(np.float32),
        "b": rng.normal(size=4).astype(np.float32),
    }


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 8), data=st.data())
def test_order_does_not_matter(seed: int, n: int, data: st.DataObject) -> None:
    rng = np.random.default_rng(seed)
    deltas = [_tensors(rng) for _ in range(n)]
    counts = data.draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n))
    order = data.draw(st.permutations(range(n)))
    a = weighted_mean(deltas, counts)
    b = weighted_mean([deltas[i] for i in order], [counts[i] for i in order])
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1), counts=st.lists(st.integers(1, 10_000), min_size=1, max_size=8)
)
def test_identical_updates_average_to_themselves(seed: int, counts: list[int]) -> None:
    delta = _tensors(np.random.default_rng(seed))
    mean = weighted_mean([delta] * len(counts), counts)
    for k in delta:
        np.testing.assert_allclose(mean[k], delta[k], rtol=1e-6)


def test_weights_by_sample_count() -> None:
    g = {"w": np.zeros(2, np.float32)}
    out = FedAvg().step(
        g,
        [{"w": np.array([1.0, 0.0], np.float32)}, {"w": np.array([0.0, 1.0], np.float32)}],
        [3, 1],
    )
    np.testing.assert_allclose(out["w"], [0.75, 0.25])
    assert out["w"].dtype == np.float32


def test_adds_the_mean_delta_to_the_global_model() -> None:
    g = {"w": np.array([10.0, -10.0], np.float32)}
    out = FedAvg().step(g, [{"w": np.array([1.0, 1.0], np.float32)}], [5])
    np.testing.assert_array_equal(out["w"], [11.0, -9.0])


def test_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError):
        weighted_mean([], [])
    with pytest.raises(ValueError):
        weighted_mean([{"w": np.zeros(1)}], [1, 2])
    with pytest.raises(ValueError):
        weighted_mean([{"w": np.zeros(1)}], [0])

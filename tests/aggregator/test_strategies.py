"""Server optimisers: FedAvgM and FedAdam follow their papers' update rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fedge.aggregator.strategies.config import StrategyConfig
from fedge.aggregator.strategies.factory import make_strategy
from fedge.aggregator.strategies.fedadam import FedAdam, fedadam_step
from fedge.aggregator.strategies.fedavg import FedAvg
from fedge.aggregator.strategies.fedavgm import FedAvgM
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.unit


def w(value: float) -> dict[str, np.ndarray]:
    return {"k": np.full((2, 2), value, np.float32)}


def test_fedavgm_accumulates_momentum() -> None:
    s = FedAvgM(server_lr=1.0, momentum=0.5)
    g = s.step(w(0.0), [w(1.0)], [1])  # v = 1
    np.testing.assert_allclose(g["k"], 1.0)
    g = s.step(g, [w(1.0)], [1])  # v = 0.5 + 1 = 1.5
    np.testing.assert_allclose(g["k"], 2.5)
    g = s.step(g, [w(0.0)], [1])  # no new delta, the velocity still moves: v = 0.75
    np.testing.assert_allclose(g["k"], 3.25)


def test_fedavgm_without_momentum_is_fedavg() -> None:
    rng = np.random.default_rng(0)
    deltas = [{"k": rng.normal(size=(3, 3)).astype(np.float32)} for _ in range(4)]
    counts = [5, 1, 7, 3]
    start = {"k": rng.normal(size=(3, 3)).astype(np.float32)}
    a = FedAvgM(server_lr=1.0, momentum=0.0).step(start, deltas, counts)
    b = FedAvg().step(start, deltas, counts)
    np.testing.assert_array_equal(a["k"], b["k"])


def test_fedadam_first_step_by_hand() -> None:
    d = 0.2
    new_w, m, v = fedadam_step(
        w(1.0), w(d), None, None, server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3
    )
    m1, v1 = 0.1 * d, 0.01 * d * d
    np.testing.assert_allclose(m["k"], m1)
    np.testing.assert_allclose(v["k"], v1)
    np.testing.assert_allclose(new_w["k"], 1.0 + 0.1 * m1 / (np.sqrt(v1) + 1e-3), rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(1e-4, 1e2), sign=st.sampled_from([-1.0, 1.0]))
def test_fedadam_step_size_is_bounded_by_server_lr_over_sqrt_one_minus_beta2(
    scale: float, sign: float
) -> None:
    """First step: |step| <= lr * (1-b1)/sqrt(1-b2), whatever the size of the delta."""
    s = FedAdam(server_lr=0.01, beta1=0.9, beta2=0.99, tau=1e-12)
    out = s.step(w(0.0), [w(sign * scale)], [3])
    bound = 0.01 * 0.1 / np.sqrt(0.01)
    assert np.all(np.abs(out["k"]) <= bound * (1 + 1e-5))
    assert np.all(np.sign(out["k"]) == sign)


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam"])
def test_state_round_trips_through_the_store(tmp_path: Path, name: str) -> None:
    from fedge.aggregator.store import Store

    rng = np.random.default_rng(1)
    a = make_strategy(StrategyConfig(name=name))  # type: ignore[arg-type]
    b = make_strategy(StrategyConfig(name=name))  # type: ignore[arg-type]
    g = {"k": np.zeros((2, 2), np.float32)}
    for _ in range(3):
        g = a.step(g, [{"k": rng.normal(size=(2, 2)).astype(np.float32)}], [2])
    store = Store(tmp_path / "s.sqlite")
    store.save_strategy_state(3, a.state())
    b.load_state(store.strategy_state(3))
    store.close()
    nxt = [{"k": rng.normal(size=(2, 2)).astype(np.float32)}]
    np.testing.assert_array_equal(a.step(g, nxt, [2])["k"], b.step(g, nxt, [2])["k"])


def test_config_picks_strategy_and_defaults() -> None:
    assert make_strategy(StrategyConfig(name="fedavg")).describe() == "fedavg"
    default = make_strategy(StrategyConfig())
    assert isinstance(default, FedAdam) and default.server_lr == 0.05
    m = make_strategy(StrategyConfig(name="fedavgm", momentum=0.7))
    assert isinstance(m, FedAvgM) and m.momentum == 0.7 and m.server_lr == 1.0
    a = make_strategy(StrategyConfig(name="fedadam", server_lr=0.03))
    assert isinstance(a, FedAdam) and a.server_lr == 0.03


def test_fedadam_is_lazy_about_coordinates_nobody_sent() -> None:
    s = FedAdam(server_lr=0.1)
    g = s.step(w(0.0), [w(0.5)], [1])
    sparse = {"k": np.array([[0.5, 0.0], [0.0, 0.0]], np.float32)}
    after = s.step(g, [sparse], [1])
    assert after["k"][0, 0] != g["k"][0, 0]  # sent: moves
    np.testing.assert_array_equal(after["k"].ravel()[1:], g["k"].ravel()[1:])  # absent: still
    assert s.v is not None and s.v["k"][1, 1] == pytest.approx(0.01 * 0.25)  # moment kept

"""Robust combiners: their laws, poisoned deltas, and learning under top-k uploads."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
from fedge.aggregator.strategies.base import Combiner, Strategy, Weights
from fedge.aggregator.strategies.config import StrategyConfig
from fedge.aggregator.strategies.factory import make_strategy
from fedge.aggregator.strategies.fedadam import FedAdam
from fedge.aggregator.strategies.fedavg import FedAvg
from fedge.aggregator.strategies.fedavgm import FedAvgM
from fedge.aggregator.strategies.robust import (
    MEAN,
    RobustCombiner,
    bound_norms,
    delta_norm,
    trimmed_mean,
    weighted_mean,
    weighted_median,
)
from fedge.protocol.codecs import decode_delta, encode_delta, parse_codec
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

pytestmark = pytest.mark.unit

COMBINERS = [
    RobustCombiner("mean"),
    RobustCombiner("median"),
    RobustCombiner("trimmed_mean", trim_fraction=0.2),
    RobustCombiner("trimmed_mean", trim_fraction=0.45),
    RobustCombiner("mean", norm_bound=2.0),
    RobustCombiner("median", norm_bound=3.0),
]
ROBUST = [RobustCombiner("median"), RobustCombiner("trimmed_mean", trim_fraction=0.2)]


def _sparse(rng: np.random.Generator, density: float, ties: bool = False) -> dict[str, np.ndarray]:
    """A delta of two tensors with about ``density`` of its entries sent (non-zero)."""
    out = {}
    for name, shape in (("k", (6, 5)), ("b", (5,))):
        values = rng.normal(size=shape)
        if ties:  # few distinct values, so that equal values with different weights meet
            values = np.round(values) + 0.5
        out[name] = np.where(rng.random(shape) < density, values, 0.0).astype(np.float32)
    return out


def _close(a: Weights, b: Weights, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol)


# -- laws ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    counts=st.lists(st.integers(1, 10_000), min_size=1, max_size=9),
    which=st.integers(0, len(COMBINERS) - 1),
    density=st.sampled_from([1.0, 0.5, 0.05]),
)
def test_identical_deltas_combine_to_themselves(
    seed: int, counts: list[int], which: int, density: float
) -> None:
    delta = _sparse(np.random.default_rng(seed), density)
    _close(COMBINERS[which]([delta] * len(counts), counts), delta, rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 9),
    which=st.integers(0, len(COMBINERS) - 1),
    density=st.sampled_from([1.0, 0.5, 0.1]),
    ties=st.booleans(),
    data=st.data(),
)
def test_order_does_not_matter(
    seed: int, n: int, which: int, density: float, ties: bool, data: st.DataObject
) -> None:
    rng = np.random.default_rng(seed)
    deltas = [_sparse(rng, density, ties) for _ in range(n)]
    counts = data.draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n))
    order = data.draw(st.permutations(range(n)))
    combine = COMBINERS[which]
    a = combine(deltas, counts)
    b = combine([deltas[i] for i in order], [counts[i] for i in order])
    _close(a, b)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    counts=st.lists(st.integers(0, 1_000), min_size=1, max_size=9).filter(lambda c: sum(c) > 0),
    density=st.sampled_from([1.0, 0.3, 0.02]),
)
def test_trimming_nothing_is_the_mean_with_absent_entries_as_zeros(
    seed: int, counts: list[int], density: float
) -> None:
    """The senders-only estimate times the senders' share is exactly the mean for the mean."""
    rng = np.random.default_rng(seed)
    deltas = [_sparse(rng, density) for _ in counts]
    _close(trimmed_mean(deltas, counts, 0.0), weighted_mean(deltas, counts))


def test_equal_counts_give_the_textbook_median_and_trimmed_mean() -> None:
    rng = np.random.default_rng(3)
    for n in (1, 2, 5, 10):
        deltas = [{"k": rng.normal(size=(4, 3))} for _ in range(n)]
        stack = np.stack([d["k"] for d in deltas])
        np.testing.assert_allclose(
            weighted_median(deltas, [7] * n)["k"], np.median(stack, axis=0), rtol=1e-12
        )
    kept = np.sort(stack, axis=0)[2:8]  # n = 10, 20% cut at each end: two values each
    np.testing.assert_allclose(trimmed_mean(deltas, [3] * 10, 0.2)["k"], kept.mean(axis=0))


def _one(values: Sequence[float]) -> list[dict[str, np.ndarray]]:
    return [{"w": np.array([v])} for v in values]


def test_sample_counts_weigh_the_median_and_the_trimmed_mean() -> None:
    assert weighted_median(_one([1, 2, 10]), [1, 1, 1])["w"][0] == 2
    assert weighted_median(_one([1, 2, 10]), [1, 1, 5])["w"][0] == 10  # 5 of 7 samples say 10
    assert weighted_median(_one([1, 3]), [2, 2])["w"][0] == 2  # an exact tie: the midpoint
    assert weighted_median(_one([1, 3]), [2, 3])["w"][0] == 3
    five = _one([-1, 1, 2, 3, 100])
    assert trimmed_mean(five, [1] * 5, 0.2)["w"][0] == pytest.approx(2.0)
    # Weight 4, 0.8 cut at each end: 0.2 of the 1 is kept and 2.2 of the 10.
    assert trimmed_mean(_one([1, 10]), [1, 3], 0.2)["w"][0] == pytest.approx(22.2 / 2.4)


# -- sparse deltas: only senders vote -------------------------------------------------------


def test_a_coordinate_is_combined_over_the_devices_that_sent_it() -> None:
    # Ten devices of 10 samples; coordinate 0 sent by three of them, 1 by nobody, 2 by a
    # device that has no samples, 3 by all.
    rows = [[0.0, 0.0, 0.0, 1.0] for _ in range(10)]
    rows[0][0], rows[1][0], rows[2][0] = 1.0, 2.0, 30.0
    deltas = [{"w": np.array(r)} for r in rows]
    counts = [10] * 10
    deltas.append({"w": np.array([0.0, 0.0, 5.0, 1.0])})
    counts.append(0)
    median = weighted_median(deltas, counts)["w"]
    # The senders' median (2) times their share of the samples (30 of 100), as the mean is
    # the senders' mean times that share.
    np.testing.assert_allclose(median, [2.0 * 0.3, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(weighted_mean(deltas, counts)["w"], [330 / 100, 0.0, 0.0, 1.0])


def test_the_median_over_every_device_would_stop_learning_under_top_k() -> None:
    rng = np.random.default_rng(0)
    spec = parse_codec("topk:0.02+int8")
    truth = rng.normal(size=2_000)
    deltas = []
    for _ in range(10):
        enc = encode_delta({"w": (truth + rng.normal(size=2_000)).astype(np.float32)}, spec, rng)
        deltas.append(decode_delta(enc.tensors, enc.meta))
    sent = np.stack([d["w"] for d in deltas]).any(axis=0)
    naive = np.median(np.stack([d["w"] for d in deltas]), axis=0)
    assert np.count_nonzero(naive) < 0.05 * np.count_nonzero(sent)  # 4 of 290 here
    for combine in ROBUST:
        out = combine(deltas, [50] * 10)["w"]
        assert (out[sent] != 0).mean() > 0.95 and not out[~sent].any()


def test_the_true_direction_is_recovered_from_sparse_deltas() -> None:
    """Each of 15 devices sends 10% of the coordinates of a noisy truth: the robust combiners
    point where the mean points, the truth's way."""
    rng = np.random.default_rng(7)
    truth = rng.normal(size=(40, 25))
    deltas, counts = [], []
    for _ in range(15):
        noisy = truth + 0.5 * rng.normal(size=truth.shape)
        deltas.append({"w": np.where(rng.random(truth.shape) < 0.1, noisy, 0.0)})
        counts.append(int(rng.integers(20, 80)))
    mean = weighted_mean(deltas, counts)["w"]
    for combine in ROBUST:
        out = combine(deltas, counts)["w"]
        assert _cosine(out, truth) > 0.9 * _cosine(mean, truth)
        assert 0.7 < np.linalg.norm(out) / np.linalg.norm(mean) < 1.3  # the mean's pace


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.vdot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- poisoned deltas -----------------------------------------------------------------------


ATTACKS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "scaled x10": lambda d: 10 * d,
    "sign-flipped": lambda d: -d,
    "sign-flipped x10": lambda d: -10 * d,
}


def _round(
    rng: np.random.Generator, honest: int, poisoned: int, attack: str, codec: str | None = None
) -> tuple[np.ndarray, list[dict[str, np.ndarray]], list[int]]:
    """A truth with a few large coordinates (as gradients have) and the round's deltas."""
    truth = rng.normal(size=1_000) * np.exp(1.5 * rng.normal(size=1_000))
    deltas = []
    for i in range(honest + poisoned):
        d = truth + 0.3 * np.abs(truth).mean() * rng.normal(size=truth.shape)
        if i >= honest:
            d = ATTACKS[attack](d)
        if codec is None:
            deltas.append({"w": d})
        else:
            enc = encode_delta({"w": d.astype(np.float32)}, parse_codec(codec), rng)
            deltas.append(decode_delta(enc.tensors, enc.meta))
    return truth, deltas, [int(rng.integers(40, 60)) for _ in deltas]


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("combine", ROBUST, ids=lambda c: c.describe())
def test_a_few_poisoned_deltas_barely_move_the_robust_combiners(
    attack: str, combine: RobustCombiner
) -> None:
    rng = np.random.default_rng(11)
    truth, deltas, counts = _round(rng, 8, 2, attack)
    clean = combine(deltas[:8], counts[:8])["w"]
    poisoned = combine(deltas, counts)["w"]
    mean = weighted_mean(deltas, counts)["w"]
    scale = np.linalg.norm(truth)
    assert np.linalg.norm(poisoned - clean) < 0.15 * scale
    assert np.linalg.norm(mean - weighted_mean(deltas[:8], counts[:8])["w"]) > 0.35 * scale
    assert _cosine(poisoned, truth) > 0.95


@pytest.mark.parametrize("attack", ["scaled x10", "sign-flipped x10"])
@pytest.mark.parametrize("combine", ROBUST, ids=lambda c: c.describe())
def test_poisoned_top_k_deltas_barely_move_the_robust_combiners(
    attack: str, combine: RobustCombiner
) -> None:
    """Top-k keeps the same large coordinates of an honest and a poisoned delta, so the
    senders of a coordinate include the honest majority."""
    rng = np.random.default_rng(5)
    truth, deltas, counts = _round(rng, 8, 2, attack, codec="topk:0.02+int8")
    assert _cosine(combine(deltas, counts)["w"], combine(deltas[:8], counts[:8])["w"]) > 0.98
    if attack.startswith("sign"):
        assert _cosine(weighted_mean(deltas, counts)["w"], truth) < 0


# -- norm bounding -------------------------------------------------------------------------


def test_norm_bounding_caps_a_large_delta_at_the_bound_times_the_median() -> None:
    rng = np.random.default_rng(2)
    base = {"k": rng.normal(size=(3, 3)), "b": rng.normal(size=3)}
    unit = 1 / delta_norm(base)
    deltas: list[Weights] = [{k: v * unit * s for k, v in base.items()} for s in (1, 1.1, 0.9)]
    deltas.append({k: v * unit * 10 for k, v in base.items()})  # 10x the others
    deltas += [{k: np.zeros_like(v) for k, v in base.items()}] * 3  # skips: not votes
    out = bound_norms(deltas, 2.0)
    assert out.cap == pytest.approx(2.0) and out.scaled == 1
    assert delta_norm(out.deltas[3]) == pytest.approx(2.0)
    np.testing.assert_allclose(out.deltas[3]["k"] / deltas[3]["k"], 0.2)  # same direction
    assert all(a is b for i, (a, b) in enumerate(zip(deltas, out.deltas, strict=True)) if i != 3)


def test_norm_bounding_with_two_devices_trusts_the_smaller() -> None:
    out = bound_norms(_one([1.0, -10.0]), 1.0)  # the lower median: one liar of two is capped
    assert out.deltas[1]["w"][0] == pytest.approx(-1.0)


def test_norm_bounding_leaves_a_round_of_zeros_alone() -> None:
    zeros = _one([0.0, 0.0])
    out = bound_norms(zeros, 3.0)
    assert out.scaled == 0 and out.deltas == zeros


def test_the_mean_with_norm_bounding_limits_what_one_device_can_do() -> None:
    deltas = _one([1.0, 1.0, 1.0, 100.0])
    assert MEAN(deltas, [1] * 4)["w"][0] == pytest.approx(103 / 4)
    assert RobustCombiner("mean", norm_bound=2.0)(deltas, [1] * 4)["w"][0] == pytest.approx(5 / 4)


# -- learning under the default codec ------------------------------------------------------


class _NaiveMedian:
    """The plain coordinate-wise median, absent entries counted as zeros: what not to do."""

    def __call__(self, deltas: Sequence[Weights], counts: Sequence[int]) -> dict[str, np.ndarray]:
        return {k: np.median(np.stack([d[k] for d in deltas]), axis=0) for k in deltas[0]}

    def describe(self) -> str:
        return "naive median"


def _learn(strategy: Strategy, rounds: int = 80, devices: int = 10, skips: int = 2) -> float:
    """Devices pull a quadratic's minimum through top-k 2% + int8 with error feedback; two
    of them skip every round (zero deltas). The distance left, relative to the start."""
    rng = np.random.default_rng(0)
    spec = parse_codec("topk:0.02+int8")
    target = rng.normal(size=(20, 25))
    local = [target + 0.2 * rng.normal(size=target.shape) for _ in range(devices)]
    residual = [np.zeros(target.shape) for _ in range(devices)]
    weights: dict[str, np.ndarray] = {"w": np.zeros(target.shape, np.float32)}
    for _ in range(rounds):
        deltas: list[Weights] = [{"w": np.zeros(target.shape, np.float32)}] * skips
        for i in range(skips, devices):
            d = 0.5 * (local[i] - weights["w"]) + residual[i]
            enc = encode_delta({"w": d.astype(np.float32)}, spec, rng)
            deltas.append(decode_delta(enc.tensors, enc.meta))
            residual[i] = d - deltas[-1]["w"]
        weights = strategy.step(weights, deltas, [50] * devices)
    return float(np.linalg.norm(weights["w"] - target) / np.linalg.norm(target))


@pytest.mark.parametrize(
    "make",
    [FedAvg, FedAdam],
    ids=["fedavg", "fedadam"],
)
def test_robust_combiners_learn_with_top_k_deltas(make: Callable[..., Strategy]) -> None:
    mean = _learn(make(combiner=MEAN))
    assert mean < 0.3  # from 1
    for combine in ROBUST:
        assert _learn(make(combiner=combine)) < mean + 0.05
    assert _learn(make(combiner=_NaiveMedian())) > 0.85  # 0.90 (fedavg), 0.99 (fedadam)


# -- in the optimisers and the config ------------------------------------------------------


@pytest.mark.parametrize("make", [FedAvg, FedAvgM, FedAdam], ids=["fedavg", "fedavgm", "fedadam"])
def test_every_optimiser_steps_with_its_combiners_output(make: Callable[..., Strategy]) -> None:
    rng = np.random.default_rng(4)
    deltas = [_sparse(rng, 0.5) for _ in range(5)]
    counts = [3, 9, 4, 4, 1]
    start = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in deltas[0].items()}
    combine: Combiner = RobustCombiner("median", norm_bound=1.5)
    a = make(combiner=combine).step(start, deltas, counts)
    b = make(combiner=MEAN).step(start, [combine(deltas, counts)], [1])
    _close(a, b, rtol=0, atol=0)


def test_config_names_the_combiner() -> None:
    s = make_strategy(StrategyConfig(name="fedavg", robust="median", norm_bound=3))
    assert s.describe() == "fedavg [median, norm_bound=3]"
    s = make_strategy(StrategyConfig(robust="trimmed_mean", trim_fraction=0.1))
    assert isinstance(s, FedAdam)
    assert s.combiner == RobustCombiner("trimmed_mean", trim_fraction=0.1)
    assert s.describe().endswith("[trimmed_mean(trim_fraction=0.1)]")
    assert make_strategy(StrategyConfig()).combiner == MEAN


@pytest.mark.parametrize(
    "bad",
    [
        {"robust": "max"},
        {"trim_fraction": 0.5},
        {"trim_fraction": -0.1},
        {"trim_fraction": float("nan")},
        {"norm_bound": -1.0},
        {"norm_bound": float("inf")},
        {"norm_bound": float("nan")},
    ],
)
def test_config_rejects_bad_settings(bad: dict) -> None:
    with pytest.raises(ValidationError):
        StrategyConfig(**bad)


def test_combiners_reject_bad_input() -> None:
    for combine in COMBINERS:
        with pytest.raises(ValueError):
            combine([], [])
        with pytest.raises(ValueError):
            combine(_one([1.0]), [1, 2])
        with pytest.raises(ValueError):
            combine(_one([1.0]), [0])
        with pytest.raises(ValueError):
            combine(_one([1.0, 2.0]), [3, -1])
    with pytest.raises(ValueError):
        RobustCombiner("trimmed_mean", trim_fraction=0.5)
    with pytest.raises(ValueError):
        RobustCombiner("median", norm_bound=-1)

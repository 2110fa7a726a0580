"""Partitioners: laws on random labels, and the label shares they give on digits."""

from __future__ import annotations

import numpy as np
import pytest
from fedge.fleet.datasets import digits
from fedge.fleet.partition import (
    KNOWN,
    Scheme,
    dirichlet,
    dominant,
    iid,
    label_shares,
    parse_scheme,
    partition,
    single,
)
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.unit

DEVICES = 10


@pytest.fixture(scope="module")
def y_digits() -> np.ndarray:
    return digits(0).y_train


def _shares(y: np.ndarray, scheme: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    parts = partition(scheme, y, DEVICES, np.random.default_rng(seed))
    return label_shares(y, parts, 10), np.array([len(p) for p in parts])


def _check_disjoint_sorted(parts: list[np.ndarray], n: int) -> np.ndarray:
    for p in parts:
        assert np.all(np.diff(p) > 0)  # sorted, no repeats
    allidx = np.concatenate(parts)
    assert len(np.unique(allidx)) == len(allidx)  # disjoint
    assert allidx.size == 0 or (allidx.min() >= 0 and allidx.max() < n)
    return allidx


# -- schemes as text ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "param", "slug"),
    [
        ("iid", "iid", None, "iid"),
        ("single", "single", None, "single"),
        ("dominant:0.9", "dominant", 0.9, "dominant-0.9"),
        (" Dominant:.9 ", "dominant", 0.9, "dominant-0.9"),
        ("dominant:1", "dominant", 1.0, "dominant-1"),
        ("dirichlet:0.1", "dirichlet", 0.1, "dirichlet-0.1"),
        ("dirichlet:100", "dirichlet", 100.0, "dirichlet-100"),
    ],
)
def test_parse_scheme(text: str, kind: str, param: float | None, slug: str) -> None:
    s = parse_scheme(text)
    assert s == Scheme(kind, param)
    assert s.slug == slug
    assert parse_scheme(str(s)) == s  # the canonical text parses back


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("zipf", "unknown partition scheme 'zipf'"),
        ("", "unknown partition scheme ''"),
        ("dominant", "needs a parameter"),
        ("dominant:", "is not a number"),
        ("dominant:abc", "'abc' is not a number"),
        ("dominant:0", "0 < P <= 1"),
        ("dominant:1.5", "0 < P <= 1"),
        ("dominant:nan", "finite"),
        ("dirichlet:0", "ALPHA > 0"),
        ("dirichlet:-1", "ALPHA > 0"),
        ("dirichlet:inf", "finite"),
        ("iid:3", "takes no parameter"),
        ("single:2", "takes no parameter"),
    ],
)
def test_bad_schemes_say_why_and_list_the_known_ones(text: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_scheme(text)
    msg = str(info.value)
    assert why in msg and KNOWN in msg and "\n" not in msg
    with pytest.raises(ValueError, match="known: iid, single, dominant"):
        partition(text, np.arange(100) % 10, 2, np.random.default_rng(0))


def test_scheme_validates_itself() -> None:
    with pytest.raises(ValueError, match="unknown partition scheme"):
        Scheme("zipf")
    with pytest.raises(ValueError, match="0 < P <= 1"):
        Scheme("dominant", 2.0)
    with pytest.raises(ValueError, match="takes no parameter"):
        Scheme("iid", 1.0)


def test_partition_accepts_a_scheme_object(y_digits: np.ndarray) -> None:
    a = partition(Scheme("dirichlet", 0.5), y_digits, 5, np.random.default_rng(4))
    b = partition("dirichlet:0.5", y_digits, 5, np.random.default_rng(4))
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))


# -- label shares on the real digits training labels, 10 devices ----------------------------


def test_iid_on_digits_is_near_uniform(y_digits: np.ndarray) -> None:
    shares, sizes = _shares(y_digits, "iid")
    assert shares.min() > 0.0 and shares.max() < 0.2  # every class, none above 20%
    assert np.abs(shares - 0.1).mean() < 0.03
    assert sizes.sum() == len(y_digits) and sizes.max() - sizes.min() <= 1


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_dominant_09_on_digits(y_digits: np.ndarray, seed: int) -> None:
    shares, sizes = _shares(y_digits, "dominant:0.9", seed)
    dom = shares.argmax(axis=1)
    assert sorted(dom.tolist()) == list(range(10))  # every device a different dominant class
    assert np.array_equal(dom, np.arange(DEVICES) % 10)  # device i: class i
    assert np.all(np.abs(shares[np.arange(DEVICES), dom] - 0.9) <= 0.03)
    rest = shares.copy()
    rest[np.arange(DEVICES), dom] = 0
    assert rest.max() <= 0.05  # the other 10% spread out, not piled on one class
    assert sizes.min() >= 10 and sizes.max() / sizes.min() > 1.5  # sizes differ
    assert sizes.sum() > 0.6 * len(y_digits)  # most of the data is used


@pytest.mark.parametrize("devices", [3, 10, 20, 50])
@pytest.mark.parametrize("p", [0.3, 0.5, 0.9, 1.0])
def test_dominant_counts_are_p_times_size_to_a_sample(
    y_digits: np.ndarray, devices: int, p: float
) -> None:
    parts = dominant(y_digits, devices, np.random.default_rng(devices), p)
    _check_disjoint_sorted(parts, len(y_digits))
    for i, part in enumerate(parts):
        held = np.bincount(y_digits[part], minlength=10)
        assert abs(held[i % 10] - p * len(part)) <= 1.0
        others = np.delete(held, i % 10)
        assert others.max() - others.min() <= 3  # the rest about evenly
        assert len(part) >= 10


def test_dominant_degrades_on_a_scarce_class_and_keeps_sizes() -> None:
    y = np.concatenate([np.zeros(12, int), np.repeat(np.arange(1, 5), 200)])
    parts = dominant(y, 8, np.random.default_rng(0), 0.9)
    _check_disjoint_sorted(parts, len(y))
    held = np.array([np.bincount(y[p], minlength=5) for p in parts])
    # class 0 has 12 samples for devices 0 and 5, which want 9 each at least: it is
    # theirs alone, shared in proportion, and the rest of their samples come from elsewhere
    assert held[0, 0] + held[5, 0] == 12 and held[:, 0].sum() == 12
    assert 0.3 <= held[0, 0] / len(parts[0]) < 0.9
    assert min(len(p) for p in parts) >= 10
    shares = label_shares(y, parts, 5)
    for i in (1, 2, 3, 4, 6, 7):  # the others are unaffected
        assert abs(shares[i, i % 5] - 0.9) < 0.03


def test_dominant_refuses_what_it_cannot_do() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="at least 2 classes"):
        dominant(np.zeros(100, int), 2, rng, 0.9)
    with pytest.raises(ValueError, match="cannot split 50 samples over 6 devices"):
        dominant(np.arange(50) % 5, 6, rng, 0.9)
    with pytest.raises(ValueError, match="0 < p <= 1"):
        dominant(np.arange(50) % 5, 2, rng, 0.0)


def test_single_on_digits_one_class_per_device(y_digits: np.ndarray) -> None:
    shares, sizes = _shares(y_digits, "single")
    assert np.array_equal(shares[np.arange(DEVICES), np.arange(DEVICES)], np.ones(DEVICES))
    assert sizes.sum() == len(y_digits)


def test_single_splits_a_class_among_its_devices_and_refuses_too_few(
    y_digits: np.ndarray,
) -> None:
    parts = single(y_digits, 25, np.random.default_rng(0))
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(y_digits)))
    for i, part in enumerate(parts):
        assert set(y_digits[part].tolist()) == {i % 10}
    sizes = [len(parts[i]) for i in (0, 10, 20)]  # class 0 over three devices, evenly
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="at least one device per class: 9 devices, 10 classes"):
        single(y_digits, 9, np.random.default_rng(0))
    with pytest.raises(ValueError, match="has 2 samples for 3 devices"):
        single(np.array([0, 0, 1, 1, 1, 1]), 6, np.random.default_rng(0))


def test_dirichlet_01_on_digits_is_highly_skewed(y_digits: np.ndarray) -> None:
    medians = []
    for seed in range(5):
        shares, sizes = _shares(y_digits, "dirichlet:0.1", seed)
        assert sizes.sum() == len(y_digits) and sizes.min() >= 10
        medians.append(np.median(shares.max(axis=1)))
    # iid gives a max share around 0.15; here a device's top class is about half its data
    assert min(medians) > 0.4 and np.median(medians) > 0.5


def test_dirichlet_100_on_digits_is_near_uniform(y_digits: np.ndarray) -> None:
    shares, sizes = _shares(y_digits, "dirichlet:100")
    assert shares.min() > 0.0 and shares.max() < 0.2
    assert np.abs(shares - 0.1).mean() < 0.03
    assert sizes.sum() == len(y_digits)


def test_dirichlet_gives_up_with_a_clear_error() -> None:
    y = np.arange(200) % 10
    with pytest.raises(ValueError, match=r"dirichlet:0\.001 gave some of 19 devices fewer than 10"):
        dirichlet(y, 19, np.random.default_rng(0), 0.001)
    with pytest.raises(ValueError, match="cannot split 200 samples over 21 devices"):
        dirichlet(y, 21, np.random.default_rng(0), 1.0)


@pytest.mark.parametrize("scheme", ["iid", "single", "dominant:0.9", "dirichlet:0.3"])
def test_same_seed_same_partition(y_digits: np.ndarray, scheme: str) -> None:
    a = partition(scheme, y_digits, 25, np.random.default_rng(7))
    b = partition(scheme, y_digits, 25, np.random.default_rng(7))
    c = partition(scheme, y_digits, 25, np.random.default_rng(8))
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


def test_label_shares_rows_sum_to_one_and_empty_rows_are_zero() -> None:
    y = np.array([0, 0, 1, 2])
    shares = label_shares(y, [np.array([0, 1, 2]), np.array([], dtype=int), np.array([3])], 3)
    assert np.allclose(shares, np.array([[2 / 3, 1 / 3, 0], [0, 0, 0], [0, 0, 1]]))


# -- laws on random label vectors ---------------------------------------------------------

labels = st.integers(2, 8).flatmap(
    lambda k: st.lists(st.integers(0, k - 1), min_size=1, max_size=300).map(np.array)
)


@settings(max_examples=60, deadline=None)
@given(y=labels, devices=st.integers(1, 30), seed=st.integers(0, 2**32 - 1))
def test_iid_covers_every_sample_once(y: np.ndarray, devices: int, seed: int) -> None:
    if devices > len(y):
        return
    parts = iid(y, devices, np.random.default_rng(seed))
    assert len(parts) == devices
    assert np.array_equal(np.sort(_check_disjoint_sorted(parts, len(y))), np.arange(len(y)))


@settings(max_examples=60, deadline=None)
@given(y=labels, extra=st.integers(0, 12), seed=st.integers(0, 2**32 - 1))
def test_single_covers_every_sample_once(y: np.ndarray, extra: int, seed: int) -> None:
    classes = np.unique(y)
    devices = len(classes) + extra
    try:
        parts = single(y, devices, np.random.default_rng(seed))
    except ValueError as exc:  # only when a class has fewer samples than its devices
        assert "samples for" in str(exc)
        return
    assert np.array_equal(np.sort(_check_disjoint_sorted(parts, len(y))), np.arange(len(y)))
    for i, part in enumerate(parts):
        assert set(y[part].tolist()) == {classes[i % len(classes)]}


@settings(max_examples=60, deadline=None)
@given(
    y=labels,
    devices=st.integers(1, 20),
    alpha=st.floats(0.05, 1000),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_covers_every_sample_once(
    y: np.ndarray, devices: int, alpha: float, seed: int
) -> None:
    parts = dirichlet(y, devices, np.random.default_rng(seed), alpha, min_samples=0)
    assert len(parts) == devices
    assert np.array_equal(np.sort(_check_disjoint_sorted(parts, len(y))), np.arange(len(y)))


@settings(max_examples=60, deadline=None)
@given(
    y=labels,
    devices=st.integers(1, 20),
    p=st.floats(0.01, 1.0),
    min_samples=st.integers(1, 10),
    seed=st.integers(0, 2**32 - 1),
)
def test_dominant_is_disjoint_and_keeps_the_minimum(
    y: np.ndarray, devices: int, p: float, min_samples: int, seed: int
) -> None:
    if len(np.unique(y)) < 2 or devices * min_samples > len(y):
        return
    parts = dominant(y, devices, np.random.default_rng(seed), p, min_samples=min_samples)
    assert len(parts) == devices
    _check_disjoint_sorted(parts, len(y))
    assert min(len(part) for part in parts) >= min_samples

"""Shamir sharing over GF(2^31 - 1): t shares give the secret back, fewer do not."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from fedge.protocol.secagg import shamir
from fedge.protocol.secagg.errors import SecAggError
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

pytestmark = pytest.mark.unit


def seeded(seed: int):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    return rng.bytes


@st.composite
def setups(draw: st.DrawFn) -> tuple[bytes, np.ndarray, int, int]:
    holders = draw(st.integers(1, 40))
    threshold = draw(st.integers(1, holders))
    xs = draw(
        st.lists(
            st.integers(1, shamir.MAX_HOLDERS - 1), min_size=holders, max_size=holders, unique=True
        )
    )
    return (
        draw(st.binary(min_size=16, max_size=16)),
        np.array(xs),
        threshold,
        draw(st.integers(0, 2**32)),
    )


def reconstruct(shares: np.ndarray, xs: np.ndarray) -> bytes:
    return shamir.from_field(shamir.combine(shares, shamir.lagrange_at_zero(xs)))


@given(setups(), st.randoms(use_true_random=False))
@settings(max_examples=150, deadline=None)
def test_any_t_shares_give_the_secret(setup: tuple[bytes, np.ndarray, int, int], rnd) -> None:  # type: ignore[no-untyped-def]
    secret, xs, t, seed = setup
    shares = shamir.split(shamir.to_field(secret)[None], xs, t, seeded(seed))
    assert shares.shape == (xs.size, 1, shamir.CHUNKS)
    assert ((shares >= 0) & (shares < shamir.P)).all()
    chosen = rnd.sample(range(xs.size), t)
    assert reconstruct(shares[chosen, 0], xs[chosen]) == secret
    # More than t shares interpolate to the same polynomial.
    assert reconstruct(shares[:, 0], xs) == secret


@given(setups())
@settings(max_examples=150, deadline=None)
def test_t_minus_1_shares_do_not_give_the_secret(setup: tuple[bytes, np.ndarray, int, int]) -> None:
    secret, xs, t, seed = setup
    if t < 2:
        return
    shares = shamir.split(shamir.to_field(secret)[None], xs, t, seeded(seed))
    for chosen in itertools.islice(itertools.combinations(range(xs.size), t - 1), 5):
        idx = list(chosen)
        try:
            wrong = reconstruct(shares[idx, 0], xs[idx])
        except SecAggError as exc:  # interpolates to field values that are no secret at all
            assert exc.reason == "bad_share"
        else:
            assert wrong != secret


def test_t_minus_1_shares_are_uniform_whatever_the_secret() -> None:
    # Holders 1 and 2 of a threshold-3 sharing: their shares of a chunk, over many sharings,
    # are uniform (chi-square on 64 bins) for an all-zero and for an all-ones secret alike.
    rnd = seeded(7)
    xs = np.array([1, 2, 3])
    for secret in (bytes(16), b"\xff" * 16):
        field = shamir.to_field(secret)[None]
        draws = np.stack([shamir.split(field, xs, 3, rnd)[:2, 0, 0] for _ in range(4000)])
        for holder in range(2):
            counts = np.bincount(draws[:, holder] * 64 // shamir.P, minlength=64)
            assert chisquare(counts).pvalue > 1e-4
    # The test can fail: the secret's own chunk is not uniform at all.
    assert chisquare(np.bincount(np.zeros(4000, np.int64), minlength=64)).pvalue < 1e-10


def test_shares_are_fresh_each_time() -> None:
    field = shamir.to_field(b"s" * 16)[None]
    xs = np.arange(1, 6)
    a = shamir.split(field, xs, 3, seeded(1))
    b = shamir.split(field, xs, 3, seeded(2))
    assert not np.array_equal(a, b)
    assert reconstruct(a[:3, 0], xs[:3]) == reconstruct(b[2:, 0], xs[2:]) == b"s" * 16


def test_threshold_one_is_the_secret_itself() -> None:
    field = shamir.to_field(b"0123456789abcdef")[None]
    shares = shamir.split(field, np.array([4, 9]), 1, seeded(0))
    assert (shares[:, 0] == field).all()


@given(st.binary(min_size=16, max_size=16))
def test_field_round_trip(secret: bytes) -> None:
    chunks = shamir.to_field(secret)
    assert chunks.max() < 1 << shamir.CHUNK_BITS
    assert shamir.from_field(chunks) == secret
    encoded = shamir.encode_share(chunks)
    assert len(encoded) == shamir.SHARE_BYTES
    assert (shamir.decode_share(encoded) == chunks).all()


def test_bad_inputs() -> None:
    field = shamir.to_field(bytes(16))[None]
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(field, np.array([1, 1, 2]), 2, seeded(0))
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(field, np.array([0, 1]), 2, seeded(0))
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(field, np.array([1, 2]), 3, seeded(0))
    with pytest.raises(ValueError, match="16 bytes"):
        shamir.to_field(bytes(15))
    with pytest.raises(SecAggError, match="bad_share"):
        shamir.decode_share(b"\xff" * shamir.SHARE_BYTES)  # 2^32 - 1 >= p
    with pytest.raises(SecAggError, match="bad_share"):
        shamir.decode_share(bytes(19))
    with pytest.raises(SecAggError, match="bad_share"):
        shamir.from_field(np.array([0, 0, 0, 0, 1 << 24]))  # the top chunk holds 24 bits

"""Shamir secret sharing (threshold t) of 16-byte secrets over GF(2^31 - 1), vectorised.

A 16-byte secret is cut into five chunks of at most 26 bits (little-endian: four of 26, one
of 24), each an element of the prime field GF(p), p = 2^31 - 1 (a Mersenne prime), and each
chunk is shared with its own random polynomial of degree t - 1: any t shares give the chunk
back by Lagrange interpolation at 0, and any t - 1 shares are uniformly distributed whatever
the secret (information-theoretic, per chunk and so for the whole secret). A share is the
five field elements as little-endian uint32: 20 bytes. The holder's x coordinate is its
1-based position in the round's device list, public and never 0.

Why not a library. Flower uses pycryptodome's ``Shamir`` (GF(2^128), 16-byte chunks). We
write these ~100 lines instead because (1) pycryptodome would be a new compiled dependency on
every device just for this; (2) its ``combine`` interpolates each secret on its own in pure
Python, O(t^2) field multiplications per chunk, while our aggregator reconstructs hundreds
of secrets from the same holders: here the Lagrange coefficients are computed once per set of
holders and every reconstruction is one vectorised dot product; (3) with p < 2^31, products
fit int64, so sharing one secret among 1,000 holders is t vectorised numpy steps instead of a
million Python multiplications on a Pi. The laws are tested with hypothesis in
tests/protocol/test_secagg_shamir.py (t shares reconstruct, any subset of t, t - 1 do not).
"""

from __future__ import annotations

import numpy as np

from .crypto import SEED_BYTES, RandomBytes
from .errors import SecAggError

P = (1 << 31) - 1
CHUNKS = 5
CHUNK_BITS = 26
SHARE_BYTES = 4 * CHUNKS
MAX_HOLDERS = 1 << 16  # holders (devices in a round): far under p, so x coordinates differ


def to_field(secret: bytes) -> np.ndarray:
    """A 16-byte secret as five field elements (int64)."""
    if len(secret) != SEED_BYTES:
        raise ValueError(f"secrets have {SEED_BYTES} bytes, not {len(secret)}")
    n = int.from_bytes(secret, "little")
    mask = (1 << CHUNK_BITS) - 1
    return np.array([(n >> (CHUNK_BITS * i)) & mask for i in range(CHUNKS)], dtype=np.int64)


def from_field(chunks: np.ndarray) -> bytes:
    """The secret back from its five chunks; SecAggError("bad_share") if a chunk is out of
    its range (shares that do not belong together interpolate to such values)."""
    n = 0
    for i, c in enumerate(int(v) for v in chunks):
        if not 0 <= c < (1 << CHUNK_BITS):
            raise SecAggError("bad_share", "the shares do not interpolate to a secret")
        n |= c << (CHUNK_BITS * i)
    if n >> (8 * SEED_BYTES):
        raise SecAggError("bad_share", "the shares do not interpolate to a secret")
    return n.to_bytes(SEED_BYTES, "little")


def _uniform(shape: tuple[int, ...], random_bytes: RandomBytes) -> np.ndarray:
    """Field elements uniform in [0, p): 31 random bits, redrawn where they equal p."""
    count = int(np.prod(shape))
    out = np.frombuffer(random_bytes(4 * count), dtype="<u4").astype(np.int64) & P
    while (redo := np.flatnonzero(out == P)).size:
        out[redo] = np.frombuffer(random_bytes(4 * redo.size), dtype="<u4").astype(np.int64) & P
    return out.reshape(shape)


def _check_xs(xs: np.ndarray) -> np.ndarray:
    xs = np.asarray(xs, dtype=np.int64).ravel()
    if xs.size and (xs.min() < 1 or xs.max() >= MAX_HOLDERS or np.unique(xs).size != xs.size):
        raise ValueError(f"holders' x coordinates must be distinct, in [1, {MAX_HOLDERS})")
    return xs


def split(
    secrets: np.ndarray, xs: np.ndarray, threshold: int, random_bytes: RandomBytes
) -> np.ndarray:
    """Shares of ``secrets`` (shape (m, 5), from ``to_field``) for holders at ``xs`` (n,):
    an (n, m, 5) int64 array, any ``threshold`` of whose rows give the secrets back."""
    xs = _check_xs(xs)
    secrets = np.asarray(secrets, dtype=np.int64)
    if not 1 <= threshold <= xs.size:
        raise ValueError(f"threshold {threshold} not in [1, {xs.size} holders]")
    coeffs = _uniform((threshold - 1, *secrets.shape), random_bytes)  # a_1 .. a_{t-1}
    x = xs.reshape(-1, *([1] * secrets.ndim))
    acc = np.zeros((xs.size, *secrets.shape), dtype=np.int64)
    for a in coeffs[::-1]:  # Horner: acc = (acc * x + a) mod p; each product < 2^62
        acc = (acc * x + a) % P
    return (acc * x + secrets) % P


def lagrange_at_zero(xs: np.ndarray) -> np.ndarray:
    """The coefficients l_j with f(0) = sum_j l_j f(x_j) for any polynomial of degree <
    len(xs): l_j = prod_{m != j} x_m / (x_m - x_j) mod p. O(t^2) Python multiplications,
    computed once per set of holders."""
    x = [int(v) for v in _check_xs(xs)]
    out = []
    for j, xj in enumerate(x):
        num = den = 1
        for m, xm in enumerate(x):
            if m != j:
                num = num * xm % P
                den = den * (xm - xj) % P
        out.append(num * pow(den, -1, P) % P)
    return np.array(out, dtype=np.int64)


def combine(shares: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """The secrets from shares (t, ...) of t holders and their ``lagrange_at_zero``."""
    shares = np.asarray(shares, dtype=np.int64)
    lam = np.asarray(coefficients, dtype=np.int64).reshape(-1, *([1] * (shares.ndim - 1)))
    terms = (lam * shares) % P  # each < 2^31, so a sum of up to 2^32 terms fits int64
    return np.asarray(terms.sum(axis=0) % P, dtype=np.int64)


def encode_share(share: np.ndarray) -> bytes:
    """One share (five field elements) as 20 bytes."""
    return np.asarray(share, dtype="<u4").tobytes()


def decode_share(data: bytes) -> np.ndarray:
    """A share from 20 bytes; SecAggError("bad_share") if an element is not below p."""
    if len(data) != SHARE_BYTES:
        raise SecAggError("bad_share", f"a share has {SHARE_BYTES} bytes, not {len(data)}")
    values = np.frombuffer(data, dtype="<u4").astype(np.int64)
    if (values >= P).any():
        raise SecAggError("bad_share", "a share element is not below the field's prime")
    return values

"""Quantisation to the ring Z_{2^k}, bit packing, and the round's shared index set (pure).

Masks cancel only in modular arithmetic on integers, so a float update is quantised first,
with a clipping range ``clip`` that every device of the round shares (the int8 codec's
per-tensor scale cannot be used: the devices' integers must mean the same float)::

    q = clip(x, -clip, clip) / clip * Q,  Q = 2^(bits-1) - 1,  then stochastic rounding:
    q = floor(q + u), u ~ U[0, 1)  (unbiased: E[q] = x / clip * Q), an integer in [-Q, Q]

and taken mod 2^k (two's complement). The sum of n <= ``max_devices`` such integers has
magnitude <= n * Q < 2^(k-1) when

    k = bits + ceil(log2(max_devices)),

so it never wraps: the unmasked sum mod 2^k, read back as a signed integer, is the exact sum
of the quantised updates, and ``dequantize_sum`` turns it into floats (sum * clip / Q).
k is at most 32 (mask entries are uint32): bits = 8 allows 2^24 devices.

On the wire a masked vector is packed at exactly k bits an entry (little-endian bit order),
so with bits = 8 it costs (8 + ceil(log2 N)) / 8 bytes an entry: 1.5 at N = 10, 1.875 at
N = 100, 2.25 at N = 1,000, against the int8 codec's 1.

Top-k. Each device's top-k positions differ, and masks only cancel where every device sends
the same positions, so the secure round uses one index set for all: ``shared_indices``, the
``count`` positions with the smallest ChaCha20 keystream values under a key from the public
round seed (a fresh uniform random subset each round). That is random-k sparsification, not
top-k; with the agent's error feedback (the residual) every entry still gets through over the
rounds (rand-k with memory converges as top-k with memory does, Stich et al. 2018), at the
cost of sending entries that are not the largest. The alternatives were worse: a union of the
devices' top-k sets must be revealed to be agreed on (it leaks which weights each device
moved), and densifying sends 1/F times the entries.
"""

from __future__ import annotations

import math

import numpy as np

from .crypto import hkdf, prg
from .errors import SecAggError

MAX_BITS = 32


def ring_bits(bits: int, max_devices: int) -> int:
    """k: the bits of the ring Z_{2^k} that holds the sum of ``max_devices`` updates
    quantised to ``bits`` bits without wrapping."""
    if not 2 <= bits <= 31 or max_devices < 1:
        raise ValueError(f"quantisation bits {bits} not in [2, 31] or devices {max_devices} < 1")
    k = bits + math.ceil(math.log2(max_devices))
    if k > MAX_BITS:
        raise ValueError(f"{max_devices} devices at {bits} bits need a {k}-bit ring, max 32")
    return k


def quantize(x: np.ndarray, clip: float, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Clip to [-clip, clip], scale to [-Q, Q] and round stochastically: int64."""
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"the clipping range must be finite and > 0, not {clip}")
    q_max = (1 << (bits - 1)) - 1
    y = np.clip(np.asarray(x, dtype=np.float64).ravel(), -clip, clip) / clip * q_max
    if not np.isfinite(y).all():
        raise ValueError("an update with values that are not finite")
    return np.clip(np.floor(y + rng.random(y.shape)), -q_max, q_max).astype(np.int64)


def to_ring(q: np.ndarray, k: int) -> np.ndarray:
    """Signed integers as elements of Z_{2^k} (uint32, two's complement)."""
    return (np.asarray(q, dtype=np.int64) & ((1 << k) - 1)).astype(np.uint32)


def from_ring(v: np.ndarray, k: int) -> np.ndarray:
    """Elements of Z_{2^k} read back as signed integers in [-2^(k-1), 2^(k-1))."""
    s = np.asarray(v, dtype=np.int64) & ((1 << k) - 1)
    return np.where(s >= (1 << (k - 1)), s - (1 << k), s)


def dequantize_sum(
    total: np.ndarray, k: int, *, count: int, max_devices: int, clip: float, bits: int
) -> np.ndarray:
    """The float64 sum of ``count`` devices' updates from their unmasked sum in Z_{2^k}.
    ``count`` (the devices whose masked inputs were summed) must be within the headroom the
    ring was sized for; divide by it (or by their weights) for the mean."""
    if not 0 <= count <= max_devices or ring_bits(bits, max_devices) != k:
        raise ValueError(f"{count} devices do not fit the ring sized for {max_devices}")
    q_max = (1 << (bits - 1)) - 1
    return from_ring(total, k).astype(np.float64) * (clip / q_max)


def pack(values: np.ndarray, k: int) -> bytes:
    """uint32 values below 2^k, k bits each, little-endian bit order, zero-padded to a byte."""
    v = np.ascontiguousarray(values, dtype="<u4")
    bits = np.unpackbits(v.view(np.uint8), bitorder="little").reshape(-1, 32)[:, :k]
    return np.packbits(bits.ravel(), bitorder="little").tobytes()


def packed_size(count: int, k: int) -> int:
    return (count * k + 7) // 8


def unpack(data: bytes, k: int, count: int) -> np.ndarray:
    """The inverse of ``pack``; SecAggError("too_short"/"too_large") for the wrong length,
    ("bad_share"...) never: any bits are some ring element."""
    if len(data) != packed_size(count, k):
        reason = "too_short" if len(data) < packed_size(count, k) else "too_large"
        raise SecAggError(reason, f"{len(data)} bytes for {count} entries of {k} bits")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: count * k]
    full = np.zeros((count, 32), dtype=np.uint8)
    full[:, :k] = bits.reshape(count, k)
    return np.packbits(full.ravel(), bitorder="little").view("<u4").astype(np.uint32)


def shared_indices(round_seed: bytes, size: int, count: int) -> np.ndarray:
    """The round's index set for top-k: ``count`` of ``size`` positions, sorted, the same on
    every device (a stable argsort of a keystream from the public round seed)."""
    if not 0 <= count <= size:
        raise ValueError(f"{count} entries out of {size}")
    keys = prg(hkdf(round_seed, b"indices", b""), size, 32)
    return np.sort(np.argsort(keys, kind="stable")[:count]).astype(np.int64)

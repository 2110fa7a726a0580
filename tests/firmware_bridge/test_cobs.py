"""COBS: round trip, no zero bytes, the overhead bound, known vectors, malformed input."""

from __future__ import annotations

import contextlib

import pytest
from fedge.firmware_bridge.cobs import CobsError, cobs_decode, cobs_encode
from hypothesis import given
from hypothesis import strategies as st

pytestmark = pytest.mark.unit

# Vectors from the COBS paper / Wikipedia (without the trailing delimiter).
VECTORS = [
    (b"", b"\x01"),
    (b"\x00", b"\x01\x01"),
    (b"\x00\x00", b"\x01\x01\x01"),
    (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
    (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
]


@pytest.mark.parametrize(("raw", "encoded"), VECTORS)
def test_known_vectors(raw: bytes, encoded: bytes) -> None:
    assert cobs_encode(raw) == encoded
    assert cobs_decode(encoded) == raw


@pytest.mark.parametrize("n", [253, 254, 255, 508, 600])
def test_long_runs_without_zeros(n: int) -> None:
    raw = bytes((i % 255) + 1 for i in range(n))
    encoded = cobs_encode(raw)
    assert 0 not in encoded
    assert cobs_decode(encoded) == raw
    for tail in (b"\x00", b"\x00\x07"):
        assert cobs_decode(cobs_encode(raw + tail)) == raw + tail


def test_canonical_254_run_without_trailing_code_decodes() -> None:
    # Some encoders end a 254-byte run with 0xFF and nothing after it.
    raw = b"\x01" * 254
    assert cobs_decode(b"\xff" + raw) == raw


@given(st.binary(max_size=2000))
def test_round_trip_and_no_zeros(raw: bytes) -> None:
    encoded = cobs_encode(raw)
    assert 0 not in encoded
    assert len(encoded) <= len(raw) + len(raw) // 254 + 1
    assert cobs_decode(encoded) == raw


@given(st.binary(max_size=300))
def test_decode_raises_only_cobs_error(data: bytes) -> None:
    with contextlib.suppress(CobsError):
        cobs_decode(data)


@pytest.mark.parametrize("bad", [b"\x05\x11\x22", b"\x00", b"\x02\x00", b"\x03\x11"])
def test_malformed_input_is_rejected(bad: bytes) -> None:
    with pytest.raises(CobsError):
        cobs_decode(bad)

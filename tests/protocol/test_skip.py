"""The compact skip notice: a few dozen bytes, round-trips, rejects what it cannot trust."""

from __future__ import annotations

import contextlib

import pytest
from fedge.protocol import DecodeError, SkipNotice, decode_skip, encode_skip, is_skip
from fedge.protocol.skip import REASONS, SIZE
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.unit


@settings(max_examples=200, deadline=None)
@given(
    round_id=st.integers(1, 2**32 - 1),
    n=st.integers(0, 2**32 - 1),
    uid=st.binary(min_size=8, max_size=8),
    trained=st.booleans(),
    reason=st.sampled_from(REASONS),
)
def test_round_trip(round_id: int, n: int, uid: bytes, trained: bool, reason: str) -> None:
    notice = SkipNotice(
        device_id="pi-7",
        round_id=round_id,
        update_id=uid.hex(),
        reason=reason,
        trained=trained,
        num_samples=n,
    )
    payload = encode_skip(notice)
    assert len(payload) == SIZE <= 64 and is_skip(payload)
    assert decode_skip(payload, "pi-7") == notice


def test_unknown_reason_travels_as_other() -> None:
    notice = SkipNotice(device_id="d", round_id=3, update_id="00" * 8, reason="solar flare")
    assert decode_skip(encode_skip(notice), "d").reason == "other"


def test_update_id_must_be_eight_bytes_of_hex() -> None:
    with pytest.raises(ValueError, match="16 hex digits"):
        encode_skip(SkipNotice(device_id="d", round_id=1, update_id="abc", reason="other"))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    with contextlib.suppress(DecodeError):  # anything else fails the test
        decode_skip(data, "d")


def test_rejects_wrong_size_magic_and_round_zero() -> None:
    good = encode_skip(SkipNotice(device_id="d", round_id=1, update_id="11" * 8, reason="busy"))
    with pytest.raises(DecodeError) as short:
        decode_skip(good[:-1], "d")
    assert short.value.reason == "too_short"
    with pytest.raises(DecodeError) as magic:
        decode_skip(b"XXXX" + good[4:], "d")
    assert magic.value.reason == "bad_magic"
    with pytest.raises(DecodeError) as zero:
        decode_skip(good[:4] + b"\0\0\0\0" + good[8:], "d")
    assert zero.value.reason == "schema"

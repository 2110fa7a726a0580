"""The compact skip notice: a few dozen bytes, round-trips, rejects what it cannot trust."""

from __future__ import annotations

import contextlib
import struct

import numpy as np
import pytest
from fedge.protocol import DecodeError, Evaluation, SkipNotice, decode_skip, encode_skip, is_skip
from fedge.protocol.skip import EVAL_SIZE, REASONS, SIZE
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
@given(
    data=st.binary(max_size=64)
    | st.binary(min_size=34, max_size=34).map(lambda b: b"FDS\x01" + b[4:])
)
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


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(1, 2**32 - 1),
    loss=st.floats(0, 1e30),
    metric=st.floats(0, 1),
    mae=st.booleans(),
)
def test_an_evaluation_travels_as_float32(
    count: int, loss: float, metric: float, mae: bool
) -> None:
    key = "mae" if mae else "accuracy"
    ev = Evaluation.model_validate({"count": count, "loss": loss, key: metric})
    notice = SkipNotice(
        device_id="d",
        round_id=2,
        update_id="22" * 8,
        reason="small_update",
        trained=True,
        num_samples=count,
        evaluation=ev,
    )
    payload = encode_skip(notice)
    assert len(payload) == EVAL_SIZE <= 64
    back = decode_skip(payload, "d").evaluation
    assert back is not None and back.count == count and getattr(back, key) is not None
    assert back.loss == float(np.float32(loss))
    assert getattr(back, key) == float(np.float32(metric))
    assert (back.accuracy is None) == mae


def test_a_notice_without_an_evaluation_keeps_its_22_bytes() -> None:
    notice = SkipNotice(device_id="d", round_id=2, update_id="22" * 8, reason="busy")
    assert len(encode_skip(notice)) == SIZE == 22


def _with_eval(count: int, loss: float, metric: float, flags: int = 1 | 2) -> bytes:
    head = encode_skip(
        SkipNotice(device_id="d", round_id=2, update_id="22" * 8, reason="small_update")
    )
    return head[:-2] + bytes([flags, head[-1]]) + struct.pack(">Iff", count, loss, metric)


@pytest.mark.parametrize(
    ("count", "loss", "metric"),
    [(5, 0.5, 1.5), (5, float("nan"), 0.5), (5, 0.5, float("inf")), (0, 0.5, 0.5), (5, -1, 0.5)],
)
def test_a_malformed_evaluation_is_refused(count: int, loss: float, metric: float) -> None:
    assert decode_skip(_with_eval(5, 0.5, 0.5), "d").evaluation is not None
    with pytest.raises(DecodeError) as bad:
        decode_skip(_with_eval(count, loss, metric), "d")
    assert bad.value.reason == "schema"


def test_the_evaluation_flag_decides_the_length() -> None:
    with pytest.raises(DecodeError) as short:
        decode_skip(_with_eval(5, 0.5, 0.5)[:SIZE], "d")
    assert short.value.reason == "too_short"
    with pytest.raises(DecodeError) as long:
        decode_skip(_with_eval(5, 0.5, 0.5, flags=1), "d")
    assert long.value.reason == "trailing_bytes"


@settings(max_examples=100, deadline=None)
@given(rest=st.integers(1, 255), evaluated=st.booleans())
def test_a_rest_travels_in_one_byte_after_the_rest(rest: int, evaluated: bool) -> None:
    ev = Evaluation(count=5, loss=0.5, accuracy=0.75) if evaluated else None
    notice = SkipNotice(
        device_id="d",
        round_id=4,
        update_id="00" * 8,
        reason="small_update",
        trained=True,
        num_samples=9,
        evaluation=ev,
        rest=rest,
    )
    payload = encode_skip(notice)
    assert len(payload) == (EVAL_SIZE if evaluated else SIZE) + 1
    assert decode_skip(payload, "d") == notice
    # The flag decides the length: without the byte, or with one more, it is refused.
    with pytest.raises(DecodeError) as short:
        decode_skip(payload[:-1], "d")
    with pytest.raises(DecodeError) as long:
        decode_skip(payload + b"\0", "d")
    assert (short.value.reason, long.value.reason) == ("too_short", "trailing_bytes")


def test_no_rest_keeps_the_bytes_of_before() -> None:
    notice = SkipNotice(device_id="d", round_id=4, update_id="00" * 8, reason="busy")
    assert len(encode_skip(notice)) == SIZE and decode_skip(encode_skip(notice), "d").rest == 0

"""Binary frames: round trip, streaming at any split, resynchronisation, sequence faults."""

from __future__ import annotations

import math
import struct

import pytest
from bridge_helpers import same_sample, split_at
from fedge.firmware_bridge.binary_frames import (
    MAX_ENCODED,
    BinaryDecoder,
    crc16_ccitt_false,
    decode_frame,
    encode_frame,
    encode_payload,
)
from fedge.firmware_bridge.cobs import cobs_encode
from fedge.firmware_bridge.sample import Sample
from hypothesis import given
from hypothesis import strategies as st

pytestmark = pytest.mark.unit

f32_from_bits = st.integers(0, 0xFFFFFFFF).map(
    lambda b: struct.unpack("<f", struct.pack("<I", b))[0]
)
f32 = st.one_of(st.floats(width=32), f32_from_bits)
samples = st.builds(
    Sample,
    sensor_id=st.integers(0, 255),
    seq=st.integers(0, 0xFFFF),
    timestamp_ms=st.integers(0, 0xFFFFFFFF),
    values=st.lists(f32, min_size=1, max_size=32).map(tuple),  # no values: bad_length
)


def sample(seq: int, sensor: int = 1, n: int = 8) -> Sample:
    return Sample(sensor, seq, 1000 + seq, tuple(float(seq + i) for i in range(n)))


def stream(seqs: list[int], sensor: int = 1) -> bytes:
    return b"".join(encode_frame(sample(s, sensor)) for s in seqs)


def test_crc_is_ccitt_false() -> None:
    assert crc16_ccitt_false(b"123456789") == 0x29B1


def test_layout_of_a_known_frame() -> None:
    payload = encode_payload(Sample(7, 0x0102, 0x03040506, (1.0,)))
    body = bytes([1, 7, 0x02, 0x01, 0x06, 0x05, 0x04, 0x03, 1]) + struct.pack("<f", 1.0)
    assert payload == body + struct.pack("<H", crc16_ccitt_false(body))
    assert encode_frame(Sample(7, 0x0102, 0x03040506, (1.0,))) == cobs_encode(payload) + b"\x00"


def test_largest_frame_fits_max_encoded() -> None:
    frame = encode_frame(Sample(255, 65535, 2**32 - 1, (1.5,) * 32))
    assert len(frame) - 1 <= MAX_ENCODED
    assert len(encode_frame(sample(0))) == 45  # 43-byte payload, 1 COBS byte, delimiter


@given(samples)
def test_round_trip(s: Sample) -> None:
    frame = encode_frame(s)
    assert frame.endswith(b"\x00") and 0 not in frame[:-1]
    decoder = BinaryDecoder()
    [got] = decoder.feed(frame)
    assert same_sample(got, s)  # float32 bit-exact; NaN stays NaN (payload not guaranteed)
    assert not decoder.faults


@given(st.lists(samples, max_size=8), st.lists(st.integers(0, 10_000), max_size=12))
def test_any_split_gives_the_same_samples(items: list[Sample], cuts: list[int]) -> None:
    data = b"".join(encode_frame(s) for s in items)
    whole = BinaryDecoder()
    expected = whole.feed(data)
    chunked = BinaryDecoder()
    got = [x for chunk in split_at(data, cuts) for x in chunked.feed(chunk)]
    assert len(got) == len(expected)
    assert all(same_sample(a, b) for a, b in zip(got, expected, strict=True))
    assert chunked.faults == whole.faults


@given(st.binary(max_size=600), st.lists(st.integers(0, 1000), max_size=8))
def test_arbitrary_bytes_never_raise_and_split_does_not_matter(
    data: bytes, cuts: list[int]
) -> None:
    whole = BinaryDecoder()
    expected = whole.feed(data)
    chunked = BinaryDecoder()
    got = [x for chunk in split_at(data, cuts) for x in chunked.feed(chunk)]
    assert got == expected or all(same_sample(a, b) for a, b in zip(got, expected, strict=True))
    assert chunked.faults == whole.faults


@given(st.binary(max_size=300), samples)
def test_garbage_then_delimiter_then_frame_decodes(garbage: bytes, s: Sample) -> None:
    decoder = BinaryDecoder()
    got = decoder.feed(garbage + b"\x00" + encode_frame(s))
    assert got and same_sample(got[-1], s)


def test_garbage_between_frames() -> None:
    decoder = BinaryDecoder()
    data = encode_frame(sample(1)) + b"\x13\x37garbage\x00" + encode_frame(sample(2))
    got = decoder.feed(data)
    assert [x.seq for x in got] == [1, 2]
    assert sum(decoder.faults.values()) == 1


def test_corrupted_byte_is_a_crc_fault_then_next_frame_decodes() -> None:
    bad = bytearray(encode_frame(sample(1)))
    bad[20] ^= 0x01  # a value byte, never zero after the flip
    assert 0 not in bad[:-1]
    decoder = BinaryDecoder()
    got = decoder.feed(bytes(bad) + encode_frame(sample(2)))
    assert [x.seq for x in got] == [2]
    assert decoder.faults["bad_crc"] == 1
    assert decoder.faults["seq_gap"] == 0  # first frame seen of this sensor


def test_truncated_frame_with_its_delimiter_then_good_frame() -> None:
    frame = encode_frame(sample(1))
    decoder = BinaryDecoder()
    got = decoder.feed(frame[:6] + b"\x00" + frame[:30] + b"\x00" + encode_frame(sample(2)))
    assert [x.seq for x in got] == [2]
    assert decoder.faults["truncated"] + decoder.faults["bad_cobs"] >= 1
    assert decoder.faults.total() == 2  # a cut that ends on a block boundary is a bad_crc


def test_frame_cut_by_a_reset_glues_to_the_next_one() -> None:
    # No delimiter after the cut: the piece and the next frame are one bad frame, the one after
    # decodes. A lone 0x00 at firmware boot (as encoded here) saves the next frame.
    cut = encode_frame(sample(1))[:20]
    decoder = BinaryDecoder()
    got = decoder.feed(cut + encode_frame(sample(2)) + encode_frame(sample(3)))
    assert [x.seq for x in got] == [3]
    assert decoder.faults.total() == 1
    decoder = BinaryDecoder()
    got = decoder.feed(cut + b"\x00" + encode_frame(sample(2)) + encode_frame(sample(3)))
    assert [x.seq for x in got] == [2, 3]


def test_too_long_is_counted_once_and_resyncs() -> None:
    for chunk in (1, 7, 10_000):
        decoder = BinaryDecoder()
        data = b"\x01" * 1000 + b"\x00" + encode_frame(sample(5))
        got = [x for i in range(0, len(data), chunk) for x in decoder.feed(data[i : i + chunk])]
        assert [x.seq for x in got] == [5]
        assert decoder.faults == {"too_long": 1}


def test_bad_version_and_bad_length() -> None:
    body = bytes([2, 1, 0, 0, 0, 0, 0, 0, 0])
    v2 = cobs_encode(body + struct.pack("<H", crc16_ccitt_false(body))) + b"\x00"
    body = bytes([1, 1, 0, 0, 0, 0, 0, 0, 3]) + struct.pack("<f", 1.0)  # says 3, has 1
    short = cobs_encode(body + struct.pack("<H", crc16_ccitt_false(body))) + b"\x00"
    decoder = BinaryDecoder()
    assert decoder.feed(v2 + short + encode_frame(sample(9))) != []
    assert decoder.faults == {"bad_version": 1, "bad_length": 1}


def test_sequence_gap_counts_missing_frames() -> None:
    decoder = BinaryDecoder()
    got = decoder.feed(stream([1, 2, 6, 7, 10]))
    assert [x.seq for x in got] == [1, 2, 6, 7, 10]  # samples after a gap are kept
    assert decoder.faults == {"seq_gap": 3 + 2}


def test_sequence_wraps_at_u16() -> None:
    decoder = BinaryDecoder()
    got = decoder.feed(stream([65533, 65534, 65535, 0, 1, 3]))
    assert len(got) == 6
    assert decoder.faults == {"seq_gap": 1}
    decoder = BinaryDecoder()
    decoder.feed(stream([65534, 2]))  # 65535, 0, 1 missed across the wrap
    assert decoder.faults == {"seq_gap": 3}


def test_duplicate_is_dropped_and_restart_is_counted() -> None:
    decoder = BinaryDecoder()
    got = decoder.feed(stream([5, 5, 6, 0, 1]))
    assert [x.seq for x in got] == [5, 6, 0, 1]
    assert decoder.faults == {"duplicate": 1, "seq_reset": 1}


def test_sensors_have_their_own_sequences() -> None:
    decoder = BinaryDecoder()
    data = b"".join(encode_frame(sample(s, sensor)) for s in range(3) for sensor in (1, 2))
    assert len(decoder.feed(data)) == 6
    assert not decoder.faults


def test_empty_frames_are_ignored() -> None:
    decoder = BinaryDecoder()
    assert len(decoder.feed(b"\x00\x00" + encode_frame(sample(0)) + b"\x00")) == 1
    assert not decoder.faults


def test_reset_drops_partial_frame() -> None:
    decoder = BinaryDecoder()
    decoder.feed(encode_frame(sample(1))[:10])
    decoder.reset()
    assert [x.seq for x in decoder.feed(encode_frame(sample(7)))] == [7]
    assert not decoder.faults


@pytest.mark.parametrize(
    "bad",
    [
        Sample(256, 0, 0, ()),
        Sample(0, 65536, 0, ()),
        Sample(0, 0, 2**32, ()),
        Sample(0, None, 0, ()),
        Sample(0, 0, None, ()),
        Sample(0, 0, 0, (0.0,) * 33),
        Sample(0, 0, 0, (1e39,)),
        Sample(0, 0, 0, (), label=1),
    ],
)
def test_encode_rejects_what_does_not_fit(bad: Sample) -> None:
    with pytest.raises(ValueError):
        encode_frame(bad)


def test_infinities_and_nan_pass_through() -> None:
    decoder = BinaryDecoder()
    [got] = decoder.feed(encode_frame(Sample(0, 0, 0, (math.inf, -math.inf, math.nan, -0.0))))
    assert got.values[:2] == (math.inf, -math.inf)
    assert math.isnan(got.values[2])
    assert math.copysign(1.0, got.values[3]) == -1.0


def test_a_frame_of_no_values_is_a_bad_length_not_a_sample() -> None:
    """The store takes no sample without values: such a frame must not reach it (it used to
    end the reader's thread)."""
    empty = encode_frame(Sample(3, 7, 1000, ()))
    dec = BinaryDecoder()
    got = dec.feed(encode_frame(sample(1)) + empty + encode_frame(sample(2)))
    assert [s.seq for s in got] == [1, 2]
    assert dec.faults["bad_length"] == 1
    assert decode_frame(empty[:-1]) == "bad_length"

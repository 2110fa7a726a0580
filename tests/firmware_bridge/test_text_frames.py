"""Text lines: CSV and key=value forms, faults, resynchronisation, streaming at any split."""

from __future__ import annotations

import math

import pytest
from bridge_helpers import split_at
from fedge.firmware_bridge.sample import Sample
from fedge.firmware_bridge.text_frames import TextDecoder, format_line
from hypothesis import given
from hypothesis import strategies as st

pytestmark = pytest.mark.unit

samples = st.builds(
    Sample,
    sensor_id=st.integers(0, 1000),
    seq=st.none() | st.integers(0, 2**32 - 1),
    timestamp_ms=st.none() | st.integers(0, 2**40),
    values=st.lists(st.floats(), min_size=1, max_size=16).map(tuple),
    label=st.none() | st.integers(0, 100),
)


def same_value(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def same_sample(a: Sample, b: Sample) -> bool:
    """Equal, with NaN equal to NaN (text values are doubles, not float32)."""
    return (a.sensor_id, a.seq, a.timestamp_ms, a.label) == (
        b.sensor_id,
        b.seq,
        b.timestamp_ms,
        b.label,
    ) and all(same_value(x, y) for x, y in zip(a.values, b.values, strict=True))


def test_csv_lines() -> None:
    decoder = TextDecoder()
    got = decoder.feed(b"12.5,3.1,0.2\r\n1 2\t3\n-1e-3, 4 ,nan\n")
    assert [s.values[:2] for s in got] == [(12.5, 3.1), (1.0, 2.0), (-0.001, 4.0)]
    assert math.isnan(got[2].values[2])
    assert got[0] == Sample(0, None, None, (12.5, 3.1, 0.2))
    assert not decoder.faults


def test_key_value_lines_in_line_order() -> None:
    decoder = TextDecoder(sensor_id=4)
    [a, b] = decoder.feed(
        b"t=1234 ax=0.1 ay=0.2 temp=31.5\nid=2,seq=17,t=99,  ay=1,ax=2,label=1\r\n"
    )
    assert a == Sample(4, None, 1234, (0.1, 0.2, 31.5))
    assert b == Sample(2, 17, 99, (1.0, 2.0), label=1)


def test_key_value_lines_with_channels() -> None:
    decoder = TextDecoder(channels=["ax", "ay"])
    got = decoder.feed(b"ay=2 ax=1 extra=9\nax=1 temp=3\nt=5 ax=1 ay=2\n")
    assert [s.values for s in got] == [(1.0, 2.0), (1.0, 2.0)]
    assert decoder.faults == {"missing_channel": 1}


def test_csv_with_channels_checks_the_count() -> None:
    decoder = TextDecoder(channels=["a", "b"])
    assert [s.values for s in decoder.feed(b"1,2\n1,2,3\n4\n")] == [(1.0, 2.0)]
    assert decoder.faults == {"wrong_field_count": 2}


@pytest.mark.parametrize(
    ("line", "fault"),
    [
        (b"\xff\xfe1,2", "not_utf8"),
        (b"1,abc", "not_numeric"),
        (b"1,,2", "not_numeric"),
        (b"ovf,1", "not_numeric"),
        (b"Starting sensor...", "not_numeric"),
        ("1,\u0663".encode(), "not_numeric"),  # an Arabic-Indic digit: float() takes it, we don't
        (b"t=-5 a=1", "not_numeric"),
        (b"t=1.5 a=1", "not_numeric"),
        (b"seq=x a=1", "not_numeric"),
        (b"a=1 b", "bad_pair"),
        (b"a= 1", "bad_pair"),
        (b"=1 a=2", "bad_pair"),
        (b"a=1 a=2", "duplicate_key"),
        (b"t=5 seq=1", "no_values"),
    ],
)
def test_bad_lines_are_counted_and_the_next_line_decodes(line: bytes, fault: str) -> None:
    decoder = TextDecoder()
    got = decoder.feed(b"1,2\n" + line + b"\r\n3,4\n")
    assert [s.values for s in got] == [(1.0, 2.0), (3.0, 4.0)]
    assert decoder.faults == {fault: 1}


def test_blank_lines_are_skipped_silently() -> None:
    decoder = TextDecoder()
    assert len(decoder.feed(b"\n\r\n  \n1\n")) == 1
    assert not decoder.faults


def test_long_line_is_dropped_and_decoder_resyncs() -> None:
    for chunk in (1, 13, 100_000):
        decoder = TextDecoder(max_line=512)
        data = b"1," * 300 + b"1\n" + b"5,6\n" + b"7" * 512 + b"\n"
        got = [s for i in range(0, len(data), chunk) for s in decoder.feed(data[i : i + chunk])]
        assert [s.values for s in got] == [(5.0, 6.0), (float("7" * 512),)]
        assert decoder.faults == {"line_too_long": 1}


def test_sequence_faults_from_seq_key() -> None:
    decoder = TextDecoder()
    got = decoder.feed(b"seq=1 a=1\nseq=1 a=1\nseq=4 a=1\nid=2 seq=0 a=1\nseq=0 a=1\n")
    assert [(s.sensor_id, s.seq) for s in got] == [(0, 1), (0, 4), (2, 0), (0, 0)]
    assert decoder.faults == {"duplicate": 1, "seq_gap": 2, "seq_reset": 1}


def test_u16_counter_with_seq_modulus() -> None:
    decoder = TextDecoder(seq_modulus=1 << 16)
    decoder.feed(b"seq=65535 a=1\nseq=0 a=1\nseq=2 a=1\n")
    assert decoder.faults == {"seq_gap": 1}


def test_unterminated_line_waits_and_reset_drops_it() -> None:
    decoder = TextDecoder()
    assert decoder.feed(b"1,2") == []
    assert [s.values for s in decoder.feed(b",3\n9")] == [(1.0, 2.0, 3.0)]
    decoder.reset()
    assert [s.values for s in decoder.feed(b"8\n")] == [(8.0,)]


@pytest.mark.parametrize("channels", [["t"], ["a", "a"], ["a=b"], [""]])
def test_bad_channel_lists_are_refused(channels: list[str]) -> None:
    with pytest.raises(ValueError):
        TextDecoder(channels=channels)


@given(samples)
def test_format_line_round_trip(s: Sample) -> None:
    decoder = TextDecoder(sensor_id=0)
    [got] = decoder.feed(format_line(s))
    assert same_sample(got, s)


@given(
    st.lists(
        samples.map(lambda s: Sample(s.sensor_id, None, s.timestamp_ms, s.values)), max_size=8
    ),
    st.lists(st.integers(0, 10_000), max_size=12),
)
def test_any_split_gives_the_same_samples(items: list[Sample], cuts: list[int]) -> None:
    data = b"".join(format_line(s) for s in items)
    whole = TextDecoder()
    expected = whole.feed(data)
    chunked = TextDecoder()
    got = [x for chunk in split_at(data, cuts) for x in chunked.feed(chunk)]
    assert len(got) == len(expected) == len(items)
    assert all(same_sample(a, b) for a, b in zip(got, expected, strict=True))


text_noise = st.lists(
    st.sampled_from(
        [b"1", b"2.5", b",", b" ", b"=", b"a", b"t", b"seq", b"\n", b"\r", b"\xff", b"nan"]
    ),
    max_size=200,
).map(b"".join)


@given(st.one_of(st.binary(max_size=600), text_noise), st.lists(st.integers(0, 1000), max_size=8))
def test_arbitrary_bytes_never_raise_and_split_does_not_matter(
    data: bytes, cuts: list[int]
) -> None:
    whole = TextDecoder(max_line=64)
    expected = whole.feed(data)
    chunked = TextDecoder(max_line=64)
    got = [x for chunk in split_at(data, cuts) for x in chunked.feed(chunk)]
    assert len(got) == len(expected)
    assert all(same_sample(a, b) for a, b in zip(got, expected, strict=True))
    assert chunked.faults == whole.faults

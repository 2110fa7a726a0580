"""The block decoder against a frame-by-frame one on the same streams, corrupted ones included.

``FrameByFrame`` is the binary decoder as it was before the block path: the splitter, then
``decode_frame`` and the sequence tracker one frame at a time. Whatever the stream and however
it is cut, ``BinaryDecoder`` must give the same samples (bit for bit), the same fault counts and
the same number of good frames; a sample dropped, added, reordered or misread fails the test.
"""

from __future__ import annotations

import random
import struct
from collections import Counter

import numpy as np
import pytest
from bridge_helpers import same_sample, split_at
from fedge.firmware_bridge.binary_frames import (
    MAX_ENCODED,
    BinaryDecoder,
    crc16_ccitt_false,
    decode_frame,
    encode_frame,
)
from fedge.firmware_bridge.cobs import CobsError, cobs_decode, cobs_decode_block, cobs_encode
from fedge.firmware_bridge.sample import Sample, SampleBatch, join_samples
from fedge.firmware_bridge.sequence import SeqTracker
from fedge.firmware_bridge.splitter import Splitter
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.unit


class FrameByFrame:
    """The reference: one frame at a time, one ``Sample`` each."""

    def __init__(self, max_frame: int = MAX_ENCODED) -> None:
        self.faults: Counter[str] = Counter()
        self.frames = 0
        self.seq = SeqTracker(1 << 16)
        self._records = Splitter(b"\x00", max_frame, self._too_long)

    def _too_long(self) -> None:
        self.faults["too_long"] += 1

    def feed(self, data: bytes) -> list[Sample]:
        out: list[Sample] = []
        for frame in self._records.feed(data):
            if not frame:
                continue
            got = decode_frame(frame)
            if isinstance(got, str):
                self.faults[got] += 1
                continue
            self.frames += 1
            verdict, missed = self.seq.check(got.sensor_id, got.seq)  # type: ignore[arg-type]
            if verdict == "duplicate":
                self.faults["duplicate"] += 1
                continue
            if verdict == "gap":
                self.faults["seq_gap"] += missed
            elif verdict == "reset":
                self.faults["seq_reset"] += 1
            out.append(got)
        return out


def assert_same_decoding(data: bytes, cuts: list[int], max_frame: int = MAX_ENCODED) -> int:
    """Both decoders over ``data`` cut at ``cuts``; returns how many samples came out."""
    reference, block = FrameByFrame(max_frame), BinaryDecoder(max_frame)
    expected: list[Sample] = []
    got: list[Sample] = []
    for chunk in split_at(data, cuts):
        expected += reference.feed(chunk)
        batch = block.feed(chunk)
        assert isinstance(batch, SampleBatch)
        got += list(batch)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert same_sample(a, b), (a, b)
    assert block.faults == reference.faults
    assert block.frames == reference.frames
    return len(got)


def corrupted_stream(rng: random.Random, n: int) -> bytes:
    """``n`` events: mostly good frames of three sensors with 0, 1, 3, 8 or 32 channels and
    their own sequence runs, and every kind of damage a serial line does to them."""
    seqs = {1: 0, 2: 40_000, 3: 65_530}
    widths = {1: 8, 2: 3, 3: 32}
    out = bytearray(b"\x00")
    for _ in range(n):
        sensor = rng.choice((1, 1, 1, 2, 3))
        width = widths[sensor] if rng.random() < 0.9 else rng.choice((0, 1, 3, 8, 32))
        seq = seqs[sensor]
        step = rng.random()
        if step < 0.03:
            seq = (seq + rng.randint(2, 40)) & 0xFFFF  # frames lost
        elif step < 0.05:
            seq = rng.randint(0, 0xFFFF)  # a restart or a jump
        elif step > 0.97:
            seq = (seq - 1) & 0xFFFF  # a repeat
        seqs[sensor] = (seq + 1) & 0xFFFF
        values = tuple(
            rng.choice((rng.uniform(-50, 50), float(rng.randint(0, 3)), float("nan"), -0.0))
            for _ in range(width)
        )
        frame = bytearray(encode_frame(Sample(sensor, seq, rng.getrandbits(32), values)))
        damage = rng.random()
        if damage < 0.03:  # a flipped bit (a zero made or lost shifts the framing)
            i = rng.randrange(len(frame) - 1)
            frame[i] ^= 1 << rng.randrange(8)
        elif damage < 0.05:  # cut short, delimiter kept or not
            frame = frame[: rng.randrange(1, len(frame))] + (b"\x00" if rng.random() < 0.5 else b"")
        elif damage < 0.06:  # line noise
            frame = bytearray(rng.randbytes(rng.randrange(1, 300))) + frame
        elif damage < 0.07:  # a payload with a good CRC and a bad header
            body = bytes([rng.choice((0, 2)), sensor, 0, 0, 0, 0, 0, 0, rng.randrange(40)])
            body += rng.randbytes(4 * rng.randrange(4))
            frame = bytearray(cobs_encode(body + struct.pack("<H", crc16_ccitt_false(body))))
            frame += b"\x00"
        elif damage < 0.075:  # an empty frame or two
            frame += b"\x00" * rng.randint(1, 2)
        out += frame
    return bytes(out)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk", [1, 45, 4096, 65536])
def test_corrupted_streams_decode_as_frame_by_frame(seed: int, chunk: int) -> None:
    rng = random.Random(seed)
    data = corrupted_stream(rng, 300 if chunk == 1 else 3000)
    cuts = list(range(chunk, len(data), chunk))
    n = assert_same_decoding(data, cuts)
    assert n > (250 if chunk == 1 else 2500)  # most frames are good: the test compared them


@pytest.mark.parametrize("seed", range(3))
def test_random_cuts_and_max_frame(seed: int) -> None:
    rng = random.Random(100 + seed)
    data = corrupted_stream(rng, 1500)
    cuts = [rng.randrange(len(data)) for _ in range(60)]
    for max_frame in (MAX_ENCODED, 12, 60, 300, 600):  # > MAX_ENCODED: the one-by-one path
        assert_same_decoding(data, cuts, max_frame)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 4000), max_size=10))
def test_arbitrary_bytes_decode_as_frame_by_frame(data: bytes, cuts: list[int]) -> None:
    assert_same_decoding(data, cuts)
    assert_same_decoding(data, cuts, max_frame=400)


@settings(deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 400), st.lists(st.integers(0, 40000)))
def test_seeded_corrupted_streams(seed: int, n: int, cuts: list[int]) -> None:
    assert_same_decoding(corrupted_stream(random.Random(seed), n), cuts)


@settings(deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=253), min_size=1, max_size=20), st.data())
def test_cobs_block_decodes_as_cobs_decode(raws: list[bytes], data: st.DataObject) -> None:
    """Rows of one length: valid encodings and bytes that are not, zeros included."""
    n = len(cobs_encode(raws[0]))
    rows = []
    for raw in raws:
        encoded = cobs_encode(raw)
        if len(encoded) == n and data.draw(st.booleans()):
            rows.append(encoded)
        else:
            rows.append(data.draw(st.binary(min_size=n, max_size=n)))
    ok, payloads = cobs_decode_block(np.frombuffer(b"".join(rows), np.uint8).reshape(-1, n))
    for row, valid, payload in zip(rows, ok.tolist(), payloads, strict=True):
        try:
            expected = cobs_decode(row)
        except CobsError:
            assert not valid
        else:
            assert valid and payload.tobytes() == expected


def test_cobs_block_refuses_lengths_it_cannot_decode() -> None:
    with pytest.raises(ValueError):
        cobs_decode_block(np.ones((2, 255), np.uint8))


@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 70_000)), max_size=60),
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 70_000)), max_size=5),
)
def test_check_many_agrees_with_check(
    first: list[tuple[int, int]], then: list[tuple[int, int]]
) -> None:
    one, many = SeqTracker(1 << 16), SeqTracker(1 << 16)
    for part in (first, then):
        verdicts = [one.check(sensor, seq) for sensor, seq in part]
        sensors = np.array([s for s, _ in part], np.int64)
        duplicate, missed, reset = many.check_many(sensors, np.array([q for _, q in part]))
        for (verdict, gap), dup, miss, res in zip(verdicts, duplicate, missed, reset, strict=True):
            assert dup == (verdict == "duplicate")
            assert res == (verdict == "reset")
            assert miss == (gap if verdict == "gap" else 0)
    for sensor in range(4):  # and both trackers remember the same last numbers
        assert one.check(sensor, 7) == many.check(sensor, 7)


def test_a_batch_is_a_sequence_of_samples() -> None:
    frames = [Sample(1, i, 100 + i, tuple(float(i + c) for c in range(8))) for i in range(5)]
    frames.append(Sample(2, 0, 7, (1.5,)))
    batch = BinaryDecoder().feed(b"".join(encode_frame(s) for s in frames))
    assert len(batch) == 6 and batch == frames and list(batch) == frames
    assert batch[-1] == frames[-1] and batch[1:3] == frames[1:3]
    assert batch.values.shape == (6, 8) and batch.channels.tolist() == [8] * 5 + [1]
    with pytest.raises(IndexError):
        batch[6]
    joined = join_samples([batch[:2], SampleBatch.empty(), batch[2:]])
    assert isinstance(joined, SampleBatch) and joined == frames
    assert join_samples([batch[:1], [frames[1]]]) == frames[:2]  # with a list: a list

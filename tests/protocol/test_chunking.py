"""Chunking: any order and duplicates reassemble exactly; corruption and junk are rejected
with a reason; memory stays within bounds; expiry runs on a fake clock."""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np
import pytest
from fedge.protocol import Status, encode
from fedge.protocol.chunking import (
    CHUNK_REASONS,
    HEADER_SIZE,
    MAGIC,
    ChunkError,
    Expired,
    Reassembler,
    is_chunk,
    parse_chunk,
    split,
)
from fedge.protocol.errors import ProtocolError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.unit

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MID = b"\x01" * 8
ids = st.binary(min_size=8, max_size=8)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_chunk(
    mid: bytes, index: int, count: int, total: int, payload_crc: int, data: bytes, version: int = 1
) -> bytes:
    """A chunk with any header fields and a correct chunk checksum."""
    head = struct.pack(">3sB8sHHII", MAGIC, version, mid, index, count, total, payload_crc)
    return head + struct.pack(">I", zlib.crc32(data, zlib.crc32(head))) + data


def rejects(reasm: Reassembler, chunk: bytes) -> str:
    with pytest.raises(ChunkError) as caught:
        reasm.add(chunk)
    assert caught.value.reason in CHUNK_REASONS
    return caught.value.reason


# -- split ----------------------------------------------------------------------------------


def test_header_layout() -> None:
    payload = bytes(range(100))
    chunks = split(payload, 28 + 40, MID)
    assert [len(c) for c in chunks] == [68, 68, 48]
    assert chunks[1] == make_chunk(MID, 1, 3, 100, zlib.crc32(payload), payload[40:80])
    assert HEADER_SIZE == 28


@FAST
@given(payload=st.binary(max_size=2000), max_chunk=st.integers(HEADER_SIZE + 1, 400))
def test_chunks_fit_and_cover_the_payload(payload: bytes, max_chunk: int) -> None:
    chunks = split(payload, max_chunk, MID)
    assert all(len(c) <= max_chunk and is_chunk(c) for c in chunks)
    assert b"".join(c[HEADER_SIZE:] for c in chunks) == payload
    assert len(chunks) == max(1, -(-len(payload) // (max_chunk - HEADER_SIZE)))


def test_small_and_empty_payloads_still_get_a_header() -> None:
    assert split(b"", 128 * 1024, MID) == [make_chunk(MID, 0, 1, 0, 0, b"")]
    (one,) = split(b"abc", 128 * 1024, MID)
    assert Reassembler().add(one) == b"abc"


def test_envelope_and_chunk_are_told_apart_by_magic() -> None:
    envelope = encode(Status(device_id="d", state="online", timestamp=1.0))
    assert not is_chunk(envelope)
    assert is_chunk(split(envelope, 64, MID)[0])
    assert not is_chunk(b"") and not is_chunk(b"FD")


@pytest.mark.parametrize(
    ("payload", "max_chunk", "mid"),
    [
        (b"x", HEADER_SIZE, MID),  # no room for data
        (b"x", 100, b"short"),
        (b"x", 100, "8 chars!"),
        (b"x" * 70_000, HEADER_SIZE + 1, MID),  # over 65535 chunks
        ("text", 100, MID),
    ],
)
def test_split_refuses(payload: Any, max_chunk: int, mid: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        split(payload, max_chunk, mid)


# -- reassembly -----------------------------------------------------------------------------


@FAST
@given(
    payload=st.binary(max_size=3000),
    max_chunk=st.integers(HEADER_SIZE + 1, 500),
    mid=ids,
    data=st.data(),
)
def test_any_order_with_duplicates_reassembles_exactly_once(
    payload: bytes, max_chunk: int, mid: bytes, data: st.DataObject
) -> None:
    chunks = split(payload, max_chunk, mid)
    extra = data.draw(st.lists(st.sampled_from(chunks), max_size=len(chunks)))
    order = data.draw(st.permutations(chunks + extra))
    reasm = Reassembler(clock=FakeClock())
    results, duplicates = [], 0
    for chunk in order:
        try:
            out = reasm.add(chunk)
        except ChunkError as exc:
            assert exc.reason == "duplicate"
            duplicates += 1
            continue
        if out is not None:
            results.append(out)
    assert results == [payload]
    assert duplicates == len(extra)
    assert reasm.pending == 0 and reasm.reserved == 0 and reasm.completed == 1


@FAST
@given(
    payloads=st.lists(st.binary(max_size=600), min_size=1, max_size=6),
    max_chunk=st.integers(HEADER_SIZE + 1, 200),
    data=st.data(),
)
def test_interleaved_messages_each_reassemble(
    payloads: list[bytes], max_chunk: int, data: st.DataObject
) -> None:
    mids = [i.to_bytes(8, "big") for i in range(len(payloads))]
    chunks = [c for p, m in zip(payloads, mids, strict=True) for c in split(p, max_chunk, m)]
    reasm = Reassembler(max_messages=len(payloads), clock=FakeClock())
    done = [reasm.add(c) for c in data.draw(st.permutations(chunks))]
    assert sorted(p for p in done if p is not None) == sorted(payloads)
    assert reasm.expire() == []


@FAST
@given(payload=st.binary(min_size=1, max_size=1000), max_chunk=st.integers(40, 300), data=st.data())
def test_a_flipped_byte_is_detected(payload: bytes, max_chunk: int, data: st.DataObject) -> None:
    chunks = split(payload, max_chunk, MID)
    which = data.draw(st.integers(0, len(chunks) - 1))
    damaged = bytearray(chunks[which])
    damaged[data.draw(st.integers(0, len(damaged) - 1))] ^= data.draw(st.integers(1, 255))
    reasm = Reassembler(clock=FakeClock())
    assert rejects(reasm, bytes(damaged)) in {"bad_checksum", "bad_magic", "bad_version"}
    out = [reasm.add(c) for c in chunks]  # the good copy still completes the message
    assert out[-1] == payload


@FAST
@given(junk=st.binary(max_size=200) | st.binary(max_size=200).map(lambda b: MAGIC + b"\x01" + b))
def test_arbitrary_bytes_raise_only_chunk_error(junk: bytes) -> None:
    reasm = Reassembler(clock=FakeClock())
    try:
        assert reasm.add(junk) is None or len(junk) >= HEADER_SIZE
    except ChunkError as exc:
        assert exc.reason in CHUNK_REASONS


@FAST
@given(
    fields=st.lists(
        st.tuples(
            st.sampled_from([MID, b"\x02" * 8]),
            st.integers(0, 4),  # index
            st.integers(0, 4),  # count
            st.integers(0, 40),  # total
            st.sampled_from([0, 1, zlib.crc32(b"")]),  # payload crc
            st.binary(max_size=20),
        ),
        max_size=12,
    ),
    max_bytes=st.integers(0, 60),
)
def test_checksummed_but_arbitrary_headers_raise_only_chunk_error(
    fields: list[tuple[bytes, int, int, int, int, bytes]], max_bytes: int
) -> None:
    reasm = Reassembler(max_messages=1, max_bytes=max_bytes, clock=FakeClock())
    for mid, index, count, total, crc, body in fields:
        try:
            out = reasm.add(make_chunk(mid, index, count, total, crc, body))
        except ChunkError as exc:
            assert exc.reason in CHUNK_REASONS
            continue
        if out is not None:
            assert len(out) == total and zlib.crc32(out) == crc
        assert reasm.held_bytes <= reasm.reserved <= max_bytes


def test_rejects_with_a_reason() -> None:
    good = split(b"abcdefghij", HEADER_SIZE + 4, MID)  # 3 chunks: 4, 4, 2 bytes
    crc = zlib.crc32(b"abcdefghij")
    reasm = Reassembler(max_bytes=100, clock=FakeClock())
    assert rejects(reasm, good[0][: HEADER_SIZE - 1]) == "too_short"
    assert rejects(reasm, b"FDG\x01" + good[0][4:]) == "bad_magic"
    assert rejects(reasm, make_chunk(MID, 0, 1, 0, 0, b"", version=2)) == "bad_version"
    assert rejects(reasm, make_chunk(MID, 3, 3, 10, crc, b"ab")) == "bad_header"  # index
    assert rejects(reasm, make_chunk(MID, 0, 0, 10, crc, b"ab")) == "bad_header"  # count 0
    assert rejects(reasm, make_chunk(MID, 0, 1, 10, crc, b"ab")) == "bad_header"  # != total
    assert rejects(reasm, make_chunk(MID, 0, 3, 1, crc, b"ab")) == "bad_header"  # > total
    assert rejects(reasm, make_chunk(MID, 0, 3, 10, crc, b"")) == "bad_header"  # empty middle
    assert rejects(reasm, make_chunk(MID, 0, 2, 101, crc, b"ab")) == "too_large"
    assert reasm.add(good[0]) is None
    assert rejects(reasm, good[0]) == "duplicate"
    assert rejects(reasm, make_chunk(MID, 0, 3, 10, crc, b"abcX")) == "inconsistent"  # changed
    assert rejects(reasm, make_chunk(MID, 1, 4, 10, crc, b"efgh")) == "inconsistent"  # count
    assert rejects(reasm, make_chunk(MID, 1, 3, 11, crc, b"efgh")) == "inconsistent"  # total
    assert rejects(reasm, make_chunk(MID, 1, 3, 10, crc ^ 1, b"efgh")) == "inconsistent"
    assert rejects(reasm, make_chunk(MID, 1, 3, 10, crc, b"efg")) == "inconsistent"  # stride
    assert rejects(reasm, make_chunk(MID, 2, 3, 10, crc, b"ijk")) == "inconsistent"  # last
    assert reasm.add(good[2]) is None and reasm.add(good[1]) == b"abcdefghij"
    assert rejects(reasm, good[1]) == "duplicate"  # QoS 1 redelivery after completion
    assert reasm.pending == 0 and reasm.completed == 1
    with pytest.raises(ValueError):
        ChunkError("no_such_reason", "")
    assert issubclass(ChunkError, ProtocolError)
    with pytest.raises(TypeError):
        reasm.add("text")  # type: ignore[arg-type]


def test_stride_is_learnt_from_a_last_chunk_that_comes_first() -> None:
    crc = zlib.crc32(b"abcdefghij")
    reasm = Reassembler(clock=FakeClock())
    assert rejects(reasm, make_chunk(MID, 2, 3, 10, crc, b"abc")) == "inconsistent"  # 7/2
    assert rejects(reasm, make_chunk(MID, 2, 3, 10, crc, b"abcdefgh")) == "inconsistent"  # 1/2
    assert reasm.add(make_chunk(MID, 2, 3, 10, crc, b"ij")) is None  # stride 4
    assert rejects(reasm, make_chunk(MID, 0, 3, 10, crc, b"abc")) == "inconsistent"
    assert reasm.add(make_chunk(MID, 0, 3, 10, crc, b"abcd")) is None


def test_a_payload_checksum_mismatch_drops_the_message() -> None:
    reasm = Reassembler(clock=FakeClock())
    bad = make_chunk(MID, 0, 1, 3, 12345, b"abc")
    assert rejects(reasm, bad) == "bad_checksum"
    assert rejects(reasm, bad) == "late"
    assert reasm.pending == 0 and reasm.reserved == 0


# -- expiry and memory ----------------------------------------------------------------------


def test_incomplete_messages_expire_after_the_timeout_without_progress() -> None:
    clock = FakeClock()
    reasm = Reassembler(timeout=30.0, clock=clock)
    a = split(b"a" * 100, HEADER_SIZE + 10, b"aaaaaaaa")  # 10 chunks
    b = split(b"b" * 100, HEADER_SIZE + 10, b"bbbbbbbb")
    reasm.add(a[0])
    reasm.add(b[0])
    clock.now += 20
    reasm.add(b[1])  # progress restarts b's timer
    assert reasm.expire() == []
    clock.now += 10
    assert reasm.expire() == [Expired(b"aaaaaaaa", "timeout", 10, 9, 100)]
    assert rejects(reasm, a[1]) == "late"
    clock.now += 19.9
    assert reasm.expire() == []
    clock.now += 0.1
    assert reasm.expire() == [Expired(b"bbbbbbbb", "timeout", 10, 8, 100)]
    assert reasm.expired == 2 and reasm.pending == 0 and reasm.reserved == 0


def test_oldest_incomplete_messages_are_evicted_first_and_reported() -> None:
    reasm = Reassembler(max_messages=2, max_bytes=250, clock=FakeClock())
    chunks = {m: split(bytes(100), HEADER_SIZE + 50, m.encode() * 8) for m in "abcd"}  # 2 each
    reasm.add(chunks["a"][0])
    reasm.add(chunks["b"][0])
    reasm.add(chunks["c"][0])  # third message: a goes
    assert reasm.evicted == 1 and reasm.pending == 2
    reasm.add(chunks["b"][1])  # b completes
    reasm.add(chunks["d"][0])  # c and d: 200 bytes reserved
    gone = reasm.expire()
    assert gone == [Expired(b"a" * 8, "evicted", 2, 1, 100)]
    assert rejects(reasm, chunks["a"][1]) == "late"
    big = split(bytes(120), HEADER_SIZE + 60, b"e" * 8)
    reasm.add(big[0])  # needs 120 of 250 with 200 reserved: c goes
    assert [g.message_id for g in reasm.expire()] == [b"c" * 8]
    assert reasm.reserved == 220 and reasm.evicted == 2


@FAST
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=12),
    max_messages=st.integers(1, 4),
    max_bytes=st.integers(0, 700),
    data=st.data(),
)
def test_memory_bounds_hold(
    sizes: list[int], max_messages: int, max_bytes: int, data: st.DataObject
) -> None:
    clock = FakeClock()
    reasm = Reassembler(max_messages=max_messages, max_bytes=max_bytes, timeout=5, clock=clock)
    payloads = {i.to_bytes(8, "big"): bytes([i]) * n for i, n in enumerate(sizes)}
    chunks = [c for m, p in payloads.items() for c in split(p, HEADER_SIZE + 64, m)]
    completed, lost = 0, 0
    for chunk in data.draw(st.permutations(chunks)):
        clock.now += data.draw(st.sampled_from([0, 0, 1, 3]))
        try:
            out = reasm.add(chunk)
        except ChunkError as exc:
            assert exc.reason in {"too_large", "late"}
            continue
        if out is not None:
            assert out in payloads.values()
            completed += 1
        assert reasm.pending <= max_messages
        assert reasm.held_bytes <= reasm.reserved <= max_bytes
        lost += len(reasm.expire())
    lost += len(reasm.expire())
    assert completed == reasm.completed
    assert lost == reasm.expired + reasm.evicted
    fits = sum(1 for p in payloads.values() if len(p) <= max_bytes)
    assert completed + lost + reasm.pending == fits  # every message is accounted for once


def test_finished_ids_are_bounded() -> None:
    reasm = Reassembler(max_finished=3, clock=FakeClock())
    for i in range(5):
        reasm.add(split(b"x", 64, i.to_bytes(8, "big"))[0])
    assert rejects(reasm, split(b"x", 64, (4).to_bytes(8, "big"))[0]) == "duplicate"
    assert reasm.add(split(b"x", 64, (0).to_bytes(8, "big"))[0]) == b"x"  # forgotten


def test_parse_chunk_reports_the_header() -> None:
    head, data = parse_chunk(split(b"hello", 30, MID)[2])
    assert (head.message_id, head.index, head.count, head.total) == (MID, 2, 3, 5)
    assert data == b"o"


@pytest.mark.parametrize(
    "kwargs", [{"max_messages": 0}, {"max_bytes": -1}, {"timeout": 0}, {"max_finished": -1}]
)
def test_reassembler_validates_its_bounds(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Reassembler(**kwargs)


def test_a_large_update_through_128k_chunks() -> None:
    rng = np.random.default_rng(0)
    payload = rng.integers(0, 256, 1_000_000, dtype=np.uint8).tobytes()
    chunks = split(payload, 128 * 1024, MID)
    assert len(chunks) == 8
    reasm = Reassembler(clock=FakeClock())
    out = [reasm.add(chunks[i]) for i in rng.permutation(len(chunks))]
    assert out[-1] == payload and not any(out[:-1])

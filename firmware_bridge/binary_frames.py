"""Binary sensor frames: COBS-stuffed, 0x00-delimited, CRC-checked (wire version 1).

A frame on the wire is ``cobs_encode(payload) + b"\\x00"``. The payload, little-endian::

    offset  size    field
    0       u8      version, 1
    1       u8      sensor id
    2       u16     sequence number, +1 per frame of that sensor, wraps 65535 -> 0
    4       u32     timestamp, ms of the MCU clock (millis()), wraps after 49.7 days
    8       u8      channel count N, 0..32
    9       4 * N   values, float32
    9+4N    u16     CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no final
                    xor; ``binascii.crc_hqx(data, 0xFFFF)``) of bytes 0 .. 8+4N

so a payload is 11 + 4N bytes (43 for 8 channels), at most 139, and at most 140 bytes once
stuffed. Firmware should also send a lone 0x00 at boot so that a frame cut short by a reset
is not glued to the first frame after it.

``BinaryDecoder.feed`` takes bytes as they arrive (split anywhere) and returns the samples of
the frames they complete, as one ``SampleBatch`` (numpy columns, no Python object per sample).
It never raises on bad input; it drops the frame and counts why in ``faults``, then starts
afresh at the next 0x00::

    too_long     more than ``max_frame`` bytes before a delimiter (counted once; the rest
                 up to the next 0x00 is skipped)
    bad_cobs     not a valid COBS encoding (typically a frame that lost bytes)
    truncated    shorter than the smallest payload (11 bytes)
    bad_crc      CRC mismatch (corrupted, or two pieces of frames glued together)
    bad_version  version byte is not 1 (CRC was good)
    bad_length   channel count of 0 or above 32, or not matching the payload length (CRC
                 was good): a sample carries at least one value
    duplicate    same sequence number as the sensor's previous frame; the sample is dropped
    seq_gap      frames missing before this one, counted by how many (u16 wrap handled);
                 the sample itself is kept
    seq_reset    the sequence number went backwards by more than half the range (MCU
                 restart); the sample is kept (see ``sequence.py``)

Empty frames (two delimiters in a row) are ignored without a fault.

Float32 values round-trip bit for bit, except NaN: a NaN decodes as a NaN, but its payload
bits may change (CPython converts float32 through a double and may quieten a signalling NaN).

How the decoder keeps up: it works on everything one ``feed`` brings. It finds the 0x00s with
numpy, groups the frames by length (a sensor's frames all have one length), and for each
length decodes COBS (``cobs_decode_block``), checks the CRCs (a table lookup per byte, xored
along each row: the CRC is linear) and reads the fields through a numpy record type, for all
frames of the group at once. ``decode_frame`` does the same for one frame; it is the reference
the block path is tested against, and it decodes the rare frame longer than ``MAX_ENCODED``
(only when ``max_frame`` allows one; such a frame is never good).
"""

from __future__ import annotations

import binascii
import struct
from collections import Counter

import numpy as np

from .cobs import CobsError, cobs_decode, cobs_decode_block, cobs_encode
from .faults import record
from .sample import Sample, SampleBatch
from .sequence import SeqTracker, distinct

VERSION = 1
MAX_CHANNELS = 32
HEADER = struct.Struct("<BBHIB")
CRC = struct.Struct("<H")
MIN_PAYLOAD = HEADER.size + CRC.size  # 11
MAX_PAYLOAD = MIN_PAYLOAD + 4 * MAX_CHANNELS  # 139
MAX_ENCODED = MAX_PAYLOAD + MAX_PAYLOAD // 254 + 1  # 140, without the delimiter
_VALUES = [struct.Struct(f"<{n}f") for n in range(MAX_CHANNELS + 1)]


def crc16_ccitt_false(data: bytes) -> int:
    """CRC-16/CCITT-FALSE of ``data`` (check value of b"123456789" is 0x29B1)."""
    return binascii.crc_hqx(data, 0xFFFF)


def _crc_after() -> np.ndarray:
    """``[j, b]``: the CRC from init 0 of byte ``b`` followed by ``j`` zero bytes."""
    table = np.zeros((MAX_PAYLOAD - CRC.size, 256), np.uint16)
    table[0] = [binascii.crc_hqx(bytes([b]), 0) for b in range(256)]
    for j in range(1, len(table)):
        prev = table[j - 1].astype(np.int64)
        table[j] = ((prev << 8) & 0xFFFF) ^ table[0][prev >> 8]
    return table


# The CRC (no reflection, no final xor) is linear: the CRC of an n-byte body from init 0xFFFF
# is that of n zero bytes xor, for each byte, its own CRC from init 0 followed by the zeros
# that come after it in the body.
_CRC_AFTER = _crc_after().ravel()
_CRC_OF_ZEROS = np.array(
    [binascii.crc_hqx(bytes(n), 0xFFFF) for n in range(MAX_PAYLOAD - CRC.size + 1)], np.uint16
)


def _crc_rows(bodies: np.ndarray) -> np.ndarray:
    """``crc16_ccitt_false`` of each row of ``bodies`` (uint8, ``(k, n)``), as uint16."""
    n = bodies.shape[1]
    lookups = np.arange(n - 1, -1, -1, dtype=np.int64) * 256 + bodies
    crc: np.ndarray = np.bitwise_xor.reduce(_CRC_AFTER[lookups], axis=1) ^ _CRC_OF_ZEROS[n]
    return crc


def _layout(channels: int) -> np.dtype:
    """The payload of a frame with ``channels`` values as a numpy record."""
    return np.dtype(
        [
            ("version", "u1"),
            ("sensor_id", "u1"),
            ("seq", "<u2"),
            ("timestamp_ms", "<u4"),
            ("channels", "u1"),
            ("values", "<f4", (channels,)),
            ("crc", "<u2"),
        ]
    )


_LAYOUTS = [_layout(n) for n in range(MAX_CHANNELS + 1)]


def encode_payload(sample: Sample) -> bytes:
    """The unstuffed payload of ``sample``, CRC included; raise ValueError if it cannot fit."""
    n = len(sample.values)
    if sample.seq is None or sample.timestamp_ms is None:
        raise ValueError("a binary frame needs both seq and timestamp_ms")
    if sample.label is not None:
        raise ValueError("a binary frame carries no label")
    if not 0 <= sample.sensor_id <= 0xFF:
        raise ValueError(f"sensor_id {sample.sensor_id} is not a u8")
    if not 0 <= sample.seq <= 0xFFFF:
        raise ValueError(f"seq {sample.seq} is not a u16")
    if not 0 <= sample.timestamp_ms <= 0xFFFFFFFF:
        raise ValueError(f"timestamp_ms {sample.timestamp_ms} is not a u32")
    if n > MAX_CHANNELS:
        raise ValueError(f"{n} channels, at most {MAX_CHANNELS}")
    try:
        body = HEADER.pack(VERSION, sample.sensor_id, sample.seq, sample.timestamp_ms, n)
        body += _VALUES[n].pack(*sample.values)
    except (struct.error, OverflowError) as exc:
        raise ValueError(f"cannot pack values as float32: {exc}") from exc
    return body + CRC.pack(crc16_ccitt_false(body))


def encode_frame(sample: Sample) -> bytes:
    """``sample`` as it goes on the wire: COBS-stuffed payload plus the 0x00 delimiter."""
    return cobs_encode(encode_payload(sample)) + b"\x00"


def decode_frame(frame: bytes) -> Sample | str:
    """One frame, without its delimiter: its sample, or the fault (module docstring) that
    rejects it. Sequence numbers are not judged here."""
    try:
        payload = cobs_decode(frame)
    except CobsError:
        return "bad_cobs"
    size = len(payload)
    if size < MIN_PAYLOAD:
        return "truncated"
    if crc16_ccitt_false(payload[:-2]) != CRC.unpack_from(payload, size - 2)[0]:
        return "bad_crc"
    version, sensor_id, seq, timestamp, n = HEADER.unpack_from(payload)
    if version != VERSION:
        return "bad_version"
    if not 0 < n <= MAX_CHANNELS or size != MIN_PAYLOAD + 4 * n:
        return "bad_length"
    return Sample(sensor_id, seq, timestamp, _VALUES[n].unpack_from(payload, HEADER.size))


class _Decoded:
    """The good frames of one length: where they were in the stream and their fields."""

    def __init__(self, order: np.ndarray, fields: np.ndarray, channels: int) -> None:
        self.order = order  # index of each frame among the frames of the feed
        self.fields = fields  # records of _layout(channels)
        self.channels = channels

    def batch(self) -> SampleBatch:
        f, k = self.fields, len(self.fields)
        values = np.ascontiguousarray(f["values"].reshape(k, self.channels), np.float32)
        return SampleBatch(
            f["sensor_id"], f["seq"], f["timestamp_ms"], values, np.full(k, self.channels)
        )


class BinaryDecoder:
    """Streaming decoder of binary frames; see the module docstring for the faults."""

    def __init__(self, max_frame: int = MAX_ENCODED) -> None:
        if max_frame < MIN_PAYLOAD + 1:
            raise ValueError(f"max_frame {max_frame} cannot hold the smallest frame")
        self.max_frame = max_frame
        self.faults: Counter[str] = Counter()
        self.frames = 0  # good frames decoded (duplicates included)
        self.seq = SeqTracker(1 << 16)
        self._partial = b""  # the bytes of a frame not ended yet
        self._skipping = False  # inside an overlong frame, waiting for its delimiter

    def feed(self, data: bytes) -> SampleBatch:
        """Take the next bytes of the stream; return the samples of the frames completed."""
        data = bytes(data)
        if self._skipping:
            end = data.find(0)
            if end < 0:
                return SampleBatch.empty()
            self._skipping = False
            data = data[end + 1 :]
        stream = self._partial + data if self._partial else data
        last = stream.rfind(0)
        tail = stream[last + 1 :]
        if len(tail) > self.max_frame:
            self._fault("too_long")
            self._partial = b""
            self._skipping = True
        else:
            self._partial = tail
        if last < 0:
            return SampleBatch.empty()
        return self._frames(np.frombuffer(stream, np.uint8, count=last + 1))

    def reset(self) -> None:
        """Drop any partial frame (after a reconnect); sequence tracking starts afresh."""
        self._partial = b""
        self._skipping = False
        self.seq.forget()

    def _fault(self, kind: str, n: int = 1) -> None:
        if n:
            record(self.faults, kind, n, source="binary frames")

    def _frames(self, stream: np.ndarray) -> SampleBatch:
        """The samples of the frames in ``stream``, which ends with a delimiter."""
        ends = np.flatnonzero(stream == 0)
        starts = np.empty_like(ends)
        starts[0] = 0
        starts[1:] = ends[:-1] + 1
        lengths = ends - starts
        self._fault("too_long", int(np.count_nonzero(lengths > self.max_frame)))
        decoded: list[_Decoded] = []
        # Empty frames (consecutive delimiters, a resync byte at boot) are not frames.
        for n in distinct(lengths[(lengths > 0) & (lengths <= self.max_frame)]):
            order = np.flatnonzero(lengths == n)
            if n > MAX_ENCODED:  # never a good frame: count why, one by one
                for i in order.tolist():
                    kind = decode_frame(stream[starts[i] : ends[i]].tobytes())
                    assert isinstance(kind, str), "a frame this long cannot be good"
                    self._fault(kind)
                continue
            frames = stream[starts[order][:, None] + np.arange(n)]
            group = self._group(order, frames)
            if group is not None:
                decoded.append(group)
        return self._samples(decoded)

    def _group(self, order: np.ndarray, frames: np.ndarray) -> _Decoded | None:
        """The good frames among ``frames`` (all of one length), with faults counted."""
        ok, payloads = cobs_decode_block(frames)
        self._fault("bad_cobs", int(np.count_nonzero(~ok)))
        size = payloads.shape[1]
        if size < MIN_PAYLOAD:
            self._fault("truncated", int(np.count_nonzero(ok)))
            return None
        if not ok.all():
            order, payloads = order[ok], payloads[ok]
        body = size - CRC.size
        sent = payloads[:, body].astype(np.uint16) | (payloads[:, body + 1].astype(np.uint16) << 8)
        good = _crc_rows(payloads[:, :body]) == sent
        self._fault("bad_crc", int(np.count_nonzero(~good)))
        version = payloads[:, 0] == VERSION
        self._fault("bad_version", int(np.count_nonzero(good & ~version)))
        good &= version
        channels, rest = divmod(size - MIN_PAYLOAD, 4)
        # When no channel count fits the length, none is good; else that count is <= 32. A
        # frame of no values is no sample (the store takes none).
        if rest or channels == 0:
            fits = np.zeros(len(payloads), bool)
        else:
            fits = payloads[:, HEADER.size - 1] == channels
        self._fault("bad_length", int(np.count_nonzero(good & ~fits)))
        good &= fits
        if not good.any():
            return None
        fields = np.ascontiguousarray(payloads[good]).view(_LAYOUTS[channels]).ravel()
        return _Decoded(order[good], fields, channels)

    def _samples(self, decoded: list[_Decoded]) -> SampleBatch:
        """Put the groups back in stream order, judge the sequence numbers, drop duplicates."""
        if not decoded:
            return SampleBatch.empty()

        batch = SampleBatch.concat([g.batch() for g in decoded])
        if len(decoded) > 1:  # several lengths (different channel counts): back in stream order
            batch = batch[np.argsort(np.concatenate([g.order for g in decoded]), kind="stable")]
        self.frames += len(batch)
        duplicate, missed, reset = self.seq.check_many(batch.sensor_id, batch.seq)
        self._fault("duplicate", int(np.count_nonzero(duplicate)))
        self._fault("seq_gap", int(missed.sum()))
        self._fault("seq_reset", int(np.count_nonzero(reset)))
        return batch[~duplicate] if duplicate.any() else batch

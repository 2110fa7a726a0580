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
the frames they complete. It never raises on bad input; it drops the frame and counts why in
``faults``, then starts afresh at the next 0x00::

    too_long     more than ``max_frame`` bytes before a delimiter (counted once; the rest
                 up to the next 0x00 is skipped)
    bad_cobs     not a valid COBS encoding (typically a frame that lost bytes)
    truncated    shorter than the smallest payload (11 bytes)
    bad_crc      CRC mismatch (corrupted, or two pieces of frames glued together)
    bad_version  version byte is not 1 (CRC was good)
    bad_length   channel count above 32 or not matching the payload length (CRC was good)
    duplicate    same sequence number as the sensor's previous frame; the sample is dropped
    seq_gap      frames missing before this one, counted by how many (u16 wrap handled);
                 the sample itself is kept
    seq_reset    the sequence number went backwards by more than half the range (MCU
                 restart); the sample is kept (see ``sequence.py``)

Empty frames (two delimiters in a row) are ignored without a fault.

Float32 values round-trip bit for bit, except NaN: a NaN decodes as a NaN, but its payload
bits may change (CPython converts float32 through a double and may quieten a signalling NaN).
"""

from __future__ import annotations

import binascii
import struct
from collections import Counter

from .cobs import CobsError, cobs_decode, cobs_encode
from .faults import record
from .sample import Sample
from .sequence import SeqTracker
from .splitter import Splitter

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


class BinaryDecoder:
    """Streaming decoder of binary frames; see the module docstring for the faults."""

    def __init__(self, max_frame: int = MAX_ENCODED) -> None:
        if max_frame < MIN_PAYLOAD + 1:
            raise ValueError(f"max_frame {max_frame} cannot hold the smallest frame")
        self.max_frame = max_frame
        self.faults: Counter[str] = Counter()
        self.frames = 0  # good frames decoded (duplicates included)
        self.seq = SeqTracker(1 << 16)
        self._records = Splitter(b"\x00", max_frame, lambda: self._fault("too_long"))

    def feed(self, data: bytes) -> list[Sample]:
        """Take the next bytes of the stream; return the samples of the frames completed."""
        out: list[Sample] = []
        for frame in self._records.feed(data):
            if frame:  # consecutive delimiters (a resync byte at boot) are not frames
                self._frame(frame, out)
        return out

    def reset(self) -> None:
        """Drop any partial frame (after a reconnect); sequence tracking starts afresh."""
        self._records.reset()
        self.seq.forget()

    def _fault(self, kind: str, n: int = 1) -> None:
        record(self.faults, kind, n, source="binary frames")

    def _frame(self, frame: bytes, out: list[Sample]) -> None:
        try:
            payload = cobs_decode(frame)
        except CobsError:
            self._fault("bad_cobs")
            return
        size = len(payload)
        if size < MIN_PAYLOAD:
            self._fault("truncated")
            return
        if crc16_ccitt_false(payload[:-2]) != CRC.unpack_from(payload, size - 2)[0]:
            self._fault("bad_crc")
            return
        version, sensor_id, seq, timestamp, n = HEADER.unpack_from(payload)
        if version != VERSION:
            self._fault("bad_version")
            return
        if n > MAX_CHANNELS or size != MIN_PAYLOAD + 4 * n:
            self._fault("bad_length")
            return
        self.frames += 1
        verdict, missed = self.seq.check(sensor_id, seq)
        if verdict == "duplicate":
            self._fault("duplicate")
            return
        if verdict == "gap":
            self._fault("seq_gap", missed)
        elif verdict == "reset":
            self._fault("seq_reset")
        values = _VALUES[n].unpack_from(payload, HEADER.size)
        out.append(Sample(sensor_id, seq, timestamp, values))

"""Chunking: split a payload into MQTT publishes of at most ``max_chunk`` bytes, and put it
back together on the other side in any order. Each chunk carries a 28-byte header::

    offset  size  field (big-endian)
    0       3     magic b"FDC" (the envelope's is b"FDG": a receiver tells them apart)
    3       1     chunk format version, 1
    4       8     message id, chosen by the sender (random, or from the update id)
    12      2     chunk index, 0-based
    14      2     chunk count, 1-65535
    16      4     total payload length
    20      4     CRC-32 (zlib.crc32) of the whole payload
    24      4     CRC-32 of this chunk: bytes 0-23 followed by the chunk's data
    28      ...   data: bytes [index * stride, ...) of the payload

Every chunk but the last carries ``stride = max_chunk - 28`` bytes; the last carries the rest
(an empty payload is one chunk with no data). ``split`` always writes headers. Fast path for
the sender: a payload of at most ``max_chunk`` bytes goes out as the plain envelope, not
chunked; the receiver passes a payload to ``Reassembler.add`` when ``is_chunk`` says so, and
to ``envelope.decode`` otherwise (or once ``add`` returns it whole).

``Reassembler`` holds incomplete messages within ``max_messages`` and ``max_bytes`` (the sum
of their declared lengths, reserved when a message's first chunk arrives; the oldest
incomplete messages are evicted to make room), forgets a message ``timeout`` seconds after it
last made progress (``expire``), and remembers the ids of the last ``max_finished`` completed,
expired or evicted messages so that QoS 1 redeliveries and stragglers are not reassembled
twice. It raises nothing but ``ChunkError`` on any bytes::

    ProtocolError
    └── ChunkError   a chunk that is corrupt, inconsistent, a duplicate or late; ``reason``
                     is a short code from ``CHUNK_REASONS`` (count it; "duplicate" is the
                     normal QoS 1 redelivery and needs no warning)
"""

from __future__ import annotations

import math
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from .errors import ProtocolError

MAGIC = b"FDC"
VERSION = 1
MESSAGE_ID_SIZE = 8
MAX_CHUNKS = 0xFFFF
_HEAD = struct.Struct(">3sB8sHHII")  # everything the chunk CRC covers, before the data
_CRC = struct.Struct(">I")
HEADER_SIZE = _HEAD.size + _CRC.size  # 28

CHUNK_REASONS = frozenset(
    {
        "too_short",  # shorter than the 28-byte header
        "bad_magic",  # does not start with b"FDC"
        "bad_version",  # a chunk format version we do not speak
        "bad_checksum",  # chunk CRC, or the reassembled payload's CRC, does not match
        "bad_header",  # index >= count, count 0, or data length impossible for the header
        "too_large",  # declared total length over max_bytes
        "inconsistent",  # disagrees with earlier chunks of its message (count, length, CRC,
        # stride, or different data at an index already held)
        "duplicate",  # a chunk already held, or of a message already completed
        "late",  # a chunk of a message that expired or was evicted
    }
)


class ChunkError(ProtocolError):
    """A chunk that cannot be used. ``reason`` is one of ``CHUNK_REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in CHUNK_REASONS:
            raise ValueError(f"unknown chunk reason {reason!r}")
        self.reason = reason
        super().__init__(f"{reason}: {message}")


@dataclass(frozen=True)
class ChunkHeader:
    """The fields of a chunk's header."""

    message_id: bytes
    index: int
    count: int
    total: int
    payload_crc: int


@dataclass(frozen=True)
class Expired:
    """An incomplete message given up: ``cause`` is "timeout" (see ``Reassembler.expire``) or
    "evicted" (made room for newer messages)."""

    message_id: bytes
    cause: Literal["timeout", "evicted"]
    chunk_count: int
    missing: int  # chunks never received
    total: int  # declared payload length


def is_chunk(data: bytes) -> bool:
    """Whether a payload starts with the chunk magic (else it is a plain envelope)."""
    return bytes(data[: len(MAGIC)]) == MAGIC


def split(payload: bytes, max_chunk: int, message_id: bytes) -> list[bytes]:
    """Split ``payload`` into chunks of at most ``max_chunk`` bytes each, headers included.

    Raises ValueError if ``max_chunk`` leaves no room for data, ``message_id`` is not 8
    bytes, or the payload needs more than 65535 chunks or 4 GiB.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"a payload is bytes, not {type(payload).__name__}")
    payload = bytes(payload)
    if not isinstance(message_id, bytes) or len(message_id) != MESSAGE_ID_SIZE:
        raise ValueError(f"message id must be {MESSAGE_ID_SIZE} bytes, got {message_id!r}")
    stride = max_chunk - HEADER_SIZE
    if stride < 1:
        raise ValueError(f"max_chunk of {max_chunk} bytes leaves no room after the header")
    total = len(payload)
    if total >= 2**32:
        raise ValueError(f"payload of {total} bytes does not fit the length field")
    count = max(1, math.ceil(total / stride))
    if count > MAX_CHUNKS:
        raise ValueError(f"payload needs {count} chunks of {max_chunk} bytes, max {MAX_CHUNKS}")
    payload_crc = zlib.crc32(payload)
    chunks = []
    for index in range(count):
        data = payload[index * stride : (index + 1) * stride]
        head = _HEAD.pack(MAGIC, VERSION, message_id, index, count, total, payload_crc)
        chunks.append(head + _CRC.pack(zlib.crc32(data, zlib.crc32(head))) + data)
    return chunks


def parse_chunk(chunk: bytes) -> tuple[ChunkHeader, bytes]:
    """Check one chunk on its own (magic, version, checksum, header sanity); ChunkError."""
    if not isinstance(chunk, (bytes, bytearray, memoryview)):
        raise TypeError(f"a chunk is bytes, not {type(chunk).__name__}")
    chunk = bytes(chunk)
    if len(chunk) < HEADER_SIZE:
        raise ChunkError("too_short", f"chunk of {len(chunk)} bytes, header needs {HEADER_SIZE}")
    magic, version, message_id, index, count, total, payload_crc = _HEAD.unpack_from(chunk)
    if magic != MAGIC:
        raise ChunkError("bad_magic", f"starts with {magic!r}, want {MAGIC!r}")
    if version != VERSION:
        raise ChunkError("bad_version", f"chunk version {version}, want {VERSION}")
    (crc,) = _CRC.unpack_from(chunk, _HEAD.size)
    data = chunk[HEADER_SIZE:]
    if zlib.crc32(data, zlib.crc32(chunk[: _HEAD.size])) != crc:
        raise ChunkError("bad_checksum", f"chunk {index} of {message_id.hex()} is corrupt")
    if count == 0 or index >= count:
        raise ChunkError("bad_header", f"chunk index {index} of count {count}")
    if len(data) > total or (index == count - 1 and count == 1 and len(data) != total):
        raise ChunkError("bad_header", f"{len(data)} bytes of data for a total of {total}")
    if index < count - 1 and not data:
        raise ChunkError("bad_header", "a chunk other than the last carries no data")
    return ChunkHeader(message_id, index, count, total, payload_crc), data


@dataclass
class _Partial:
    header: ChunkHeader
    last_progress: float
    stride: int | None = None
    parts: dict[int, bytes] = field(default_factory=dict)


class Reassembler:
    """Collects chunks of many messages, in any order, within bounds of count and bytes."""

    def __init__(
        self,
        *,
        max_messages: int = 16,
        max_bytes: int = 32 * 1024 * 1024,
        timeout: float = 120.0,
        max_finished: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_messages < 1 or max_bytes < 0 or max_finished < 0:
            raise ValueError("max_messages must be >= 1, max_bytes and max_finished >= 0")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.max_finished = max_finished
        self.clock = clock
        self._partial: OrderedDict[bytes, _Partial] = OrderedDict()  # oldest first
        self._finished: OrderedDict[bytes, str] = OrderedDict()  # id -> "complete", cause
        self._gone: list[Expired] = []  # evicted since the last expire()
        self.reserved = 0  # sum of declared lengths of incomplete messages
        self.completed = 0
        self.expired = 0
        self.evicted = 0

    @property
    def pending(self) -> int:
        """Incomplete messages held."""
        return len(self._partial)

    @property
    def held_bytes(self) -> int:
        """Bytes of chunk data held (never more than ``reserved``)."""
        return sum(len(d) for p in self._partial.values() for d in p.parts.values())

    def holds(self, message_id: bytes) -> bool:
        """Whether the message is incomplete and held (not completed, refused or given up)."""
        return message_id in self._partial

    def add(self, chunk: bytes) -> bytes | None:
        """Take one chunk; return the whole payload when it completes a message, else None."""
        head, data = parse_chunk(chunk)
        mid = head.message_id
        done = self._finished.get(mid)
        if done is not None:
            reason = "duplicate" if done == "complete" else "late"
            raise ChunkError(reason, f"message {mid.hex()} already {done}")
        partial = self._partial.get(mid)
        if partial is None:
            partial = self._start(head)
        elif (head.count, head.total, head.payload_crc) != (
            partial.header.count,
            partial.header.total,
            partial.header.payload_crc,
        ):
            raise ChunkError("inconsistent", f"header of chunk {head.index} of {mid.hex()}")
        held = partial.parts.get(head.index)
        if held is not None:
            if held != data:
                raise ChunkError("inconsistent", f"chunk {head.index} of {mid.hex()} changed")
            raise ChunkError("duplicate", f"chunk {head.index} of {mid.hex()} already held")
        self._check_length(partial, head.index, len(data))
        partial.parts[head.index] = data
        partial.last_progress = self.clock()
        if len(partial.parts) < head.count:
            return None
        del self._partial[mid]
        self.reserved -= head.total
        payload = b"".join(partial.parts[i] for i in range(head.count))
        if len(payload) != head.total or zlib.crc32(payload) != head.payload_crc:
            self._finish(mid, "corrupt")
            raise ChunkError("bad_checksum", f"message {mid.hex()} reassembles to other bytes")
        self._finish(mid, "complete")
        self.completed += 1
        return payload

    def expire(self) -> list[Expired]:
        """Give up messages with no progress for ``timeout`` seconds; return them, and those
        evicted since the last call, oldest first."""
        now = self.clock()
        stale = [m for m, p in self._partial.items() if now - p.last_progress >= self.timeout]
        for mid in stale:
            self._drop(mid, "timeout")
        self.expired += len(stale)
        gone, self._gone = self._gone, []
        return gone

    def _start(self, head: ChunkHeader) -> _Partial:
        if head.total > self.max_bytes:
            raise ChunkError("too_large", f"message of {head.total} bytes, max {self.max_bytes}")
        while self._partial and (
            len(self._partial) >= self.max_messages or self.reserved + head.total > self.max_bytes
        ):
            self._drop(next(iter(self._partial)), "evicted")
            self.evicted += 1
        partial = _Partial(header=head, last_progress=self.clock())
        self._partial[head.message_id] = partial
        self.reserved += head.total
        return partial

    def _check_length(self, partial: _Partial, index: int, size: int) -> None:
        """Every chunk but the last carries ``stride`` bytes, the last the remainder."""
        count, total = partial.header.count, partial.header.total
        if index < count - 1:
            stride = size
        elif count == 1:
            return  # parse_chunk checked size == total
        elif (total - size) % (count - 1):
            raise ChunkError("inconsistent", f"a last chunk of {size} bytes for {total} in {count}")
        else:
            stride = (total - size) // (count - 1)
        last = total - (count - 1) * stride
        if partial.stride not in (None, stride) or not 0 < last <= stride:
            raise ChunkError(
                "inconsistent", f"chunk {index}: {size} bytes do not fit {count} chunks of {total}"
            )
        partial.stride = stride

    def _drop(self, mid: bytes, cause: Literal["timeout", "evicted"]) -> None:
        partial = self._partial.pop(mid)
        self.reserved -= partial.header.total
        count = partial.header.count
        missing = count - len(partial.parts)
        self._gone.append(Expired(mid, cause, count, missing, partial.header.total))
        self._finish(mid, "expired" if cause == "timeout" else cause)

    def _finish(self, mid: bytes, state: str) -> None:
        if not self.max_finished:
            return
        self._finished[mid] = state
        self._finished.move_to_end(mid)
        while len(self._finished) > self.max_finished:
            self._finished.popitem(last=False)

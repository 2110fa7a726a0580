"""The bytes of secure-aggregation messages: compact, fixed layouts, checked on decode.

Every message starts with a 13-byte header: b"FSA", version 1, the stage's kind, and the
round id (uint64, little-endian). What follows depends on the kind; every length is implied
by the round's parameters and what the receiver sent or expects before, so a decoder knows
the exact size to expect and rejects any other (``SecAggError``, reason ``too_short``,
``too_large``...) before it looks further. Devices are never named in a body: a device is its
position in the round's device list (``SecAggParams.devices``), sets of devices are bitmaps
over a list both sides know, and the sender is the topic's device (which the broker's ACL
binds to the client)::

    kind         direction            body
    ADVERTISE    device -> server     c_pk (32) | s_pk (32)
    KEYS         server -> device     bitmap over the device's holders | (c_pk, s_pk) per set bit
    SHARES       device -> server     one ciphertext (56) per other device of KEYS, in order
    FORWARD      server -> device     bitmap over the device's holders | a ciphertext per set bit
    MASKED       device -> server     the masked vector, ``length`` entries of k bits (packed)
    SURVIVORS    server -> devices    bitmap over all the round's devices: who sent MASKED
    UNMASK       device -> server     one share (20) per device of FORWARD and itself, in order:
                                      of b_u if u is in SURVIVORS, of the s seed if not

A bitmap is little-endian bit order, its padding bits zero. A ciphertext is the pair of
shares (b_u, s seed) encrypted for one neighbour (``crypto.encrypt_share``): 40 + 16 bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from enum import IntEnum

import numpy as np

from .crypto import KEY_BYTES, TAG_BYTES
from .errors import SecAggError
from .shamir import SHARE_BYTES

MAGIC = b"FSA"
VERSION = 1
_HEADER = struct.Struct("<3sBBQ")
HEADER_BYTES = _HEADER.size
CIPHERTEXT_BYTES = 2 * SHARE_BYTES + TAG_BYTES
KEYS_BYTES = 2 * KEY_BYTES


class Kind(IntEnum):
    ADVERTISE = 1
    KEYS = 2
    SHARES = 3
    FORWARD = 4
    MASKED = 5
    SURVIVORS = 6
    UNMASK = 7


def header(kind: Kind, round_id: int) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, int(kind), round_id)


def open_(payload: bytes, kind: Kind, round_id: int) -> bytes:
    """The body of a ``kind`` message of this round, its header checked."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise SecAggError("bad_magic", f"a message is bytes, not {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) < HEADER_BYTES:
        raise SecAggError("too_short", f"{len(payload)} bytes, shorter than the header")
    magic, version, got_kind, got_round = _HEADER.unpack_from(payload)
    if magic != MAGIC or version != VERSION:
        raise SecAggError("bad_magic", "not a secure-aggregation message of version 1")
    if got_kind != kind:
        raise SecAggError("wrong_stage", f"a message of kind {got_kind}, expected {kind.name}")
    if got_round != round_id:
        raise SecAggError("wrong_round", f"round {got_round}, expected {round_id}")
    return payload[HEADER_BYTES:]


def sized(data: bytes, kind: Kind, size: int) -> bytes:
    """``data`` if it has exactly ``size`` bytes."""
    if len(data) < size:
        raise SecAggError("too_short", f"{kind.name}: {len(data)} bytes, expected {size}")
    if len(data) > size:
        raise SecAggError("trailing_bytes", f"{kind.name}: {len(data)} bytes, expected {size}")
    return data


def body(payload: bytes, kind: Kind, round_id: int, size: int) -> bytes:
    """The body of a ``kind`` message of this round, which must have ``size`` bytes."""
    return sized(open_(payload, kind, round_id), kind, size)


def bitmap(flags: Sequence[bool]) -> bytes:
    return np.packbits(np.asarray(flags, dtype=bool), bitorder="little").tobytes()


def bitmap_size(n: int) -> int:
    return (n + 7) // 8


def read_bitmap(data: bytes, n: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little").astype(bool)
    if bits[n:].any():
        raise SecAggError("bad_bitmap", "padding bits of a bitmap are set")
    return bits[:n]


def items(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


# -- each kind ----------------------------------------------------------------------------------


def with_bitmap(kind: Kind, round_id: int, flags: Sequence[bool], parts: Sequence[bytes]) -> bytes:
    return header(kind, round_id) + bitmap(flags) + b"".join(parts)


def read_with_bitmap(
    payload: bytes, kind: Kind, round_id: int, n: int, item: int
) -> tuple[np.ndarray, list[bytes]]:
    """A bitmap over ``n`` and one ``item``-byte part per set bit. Checked in two steps: the
    bitmap first (its size is fixed), then the exact size it implies."""
    data = open_(payload, kind, round_id)
    head = bitmap_size(n)
    flags = read_bitmap(sized(data[:head], kind, head), n)
    sized(data, kind, head + item * int(flags.sum()))
    return flags, items(data[head:], item)


def round_bytes(holders: int, devices: int, length: int, k: int) -> dict[str, int]:
    """The bytes of each message of a device with ``holders`` share holders (itself
    included) in a round of ``devices`` where everyone takes part to the end: for capacity
    planning and the benchmark. Uploads: advertise, shares, masked, unmask; downloads: keys,
    forward, survivors."""
    others = holders - 1
    return {
        "advertise": HEADER_BYTES + KEYS_BYTES,
        "shares": HEADER_BYTES + CIPHERTEXT_BYTES * others,
        "masked": HEADER_BYTES + (length * k + 7) // 8,
        "unmask": HEADER_BYTES + SHARE_BYTES * holders,
        "keys": HEADER_BYTES + bitmap_size(holders) + KEYS_BYTES * holders,
        "forward": HEADER_BYTES + bitmap_size(holders) + CIPHERTEXT_BYTES * others,
        "survivors": HEADER_BYTES + bitmap_size(devices),
    }

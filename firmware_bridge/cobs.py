"""Consistent Overhead Byte Stuffing (Cheshire and Baker 1999): frames without zero bytes.

``cobs_encode`` turns any bytes into bytes with no 0x00, so 0x00 can delimit frames on the
wire; the overhead is one byte per 254 (at most) plus one. ``cobs_decode`` inverts it and
raises ``CobsError`` on input that no encoder could have produced: a zero byte, or a code byte
that points past the end (the usual sign of a frame cut short). Neither includes the 0x00
delimiter; the framing layer adds and strips it.

Layout: the data is split at its zeros into blocks; each block goes out as one code byte
(block length + 1) followed by the block, and the zero after it is implied. A block longer
than 253 bytes is cut into runs of 254 with code 0xFF, which imply no zero.

``cobs_decode_block`` decodes many frames of one length at once (numpy), for lengths up to
254, where a frame has no 0xFF code (a block of 254 needs 255 bytes) and decodes to one byte
less than it is: the bytes after the first with every code byte turned into a zero.
"""

from __future__ import annotations

import numpy as np


class CobsError(ValueError):
    """Bytes that are not a valid COBS encoding."""


def cobs_encode(data: bytes) -> bytes:
    """Encode ``data``; the result contains no 0x00 and is at most len + len // 254 + 1."""
    out = bytearray()
    for block in bytes(data).split(b"\x00"):
        while len(block) >= 254:
            out.append(0xFF)
            out += block[:254]
            block = block[254:]
        out.append(len(block) + 1)
        out += block
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Decode one COBS frame (without its delimiter); raise ``CobsError`` if malformed."""
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise CobsError(f"zero byte at offset {i}")
        j = i + code
        if j > n:
            raise CobsError(f"block at offset {i} needs {code - 1} bytes, {n - i - 1} left")
        block = data[i + 1 : j]
        if 0 in block:
            raise CobsError(f"zero byte inside the block at offset {i}")
        out += block
        i = j
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)


def cobs_decode_block(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode the rows of ``frames`` (uint8, ``(k, n)``, ``1 <= n <= 254``) at once.

    Returns ``(ok, payloads)``: ``ok[i]`` says whether row ``i`` is a valid encoding (what
    ``cobs_decode`` would not refuse), and ``payloads[i]`` (uint8, ``(k, n - 1)``) is then its
    decoding; rows that are not valid hold garbage.
    """
    k, n = frames.shape
    if not 1 <= n <= 254:
        raise ValueError(f"frames of {n} bytes: the block decoder takes 1 to 254")
    step = frames.astype(np.intp)
    step[step == 0] = n + 1  # a zero is never a valid code: jump past the end
    is_code = np.zeros((k, n), bool)
    pos = np.zeros(k, np.intp)
    live = np.arange(k)
    # Follow the chain of code bytes of every row in step; a row leaves once it reaches or
    # passes the end. Valid rows land exactly on the end. Steps: the most blocks in a row.
    while live.size:
        at = pos[live]
        is_code[live, at] = True
        at = at + step[live, at]
        pos[live] = at
        live = live[at < n]
    ok = (pos == n) & (frames != 0).all(axis=1)  # no zero inside a block either
    payloads = frames[:, 1:].copy()
    payloads[is_code[:, 1:]] = 0
    return ok, payloads

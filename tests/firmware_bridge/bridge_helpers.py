"""Helpers of the firmware_bridge tests: float32 comparison and splitting streams."""

from __future__ import annotations

import itertools
import math
import struct

from fedge.firmware_bridge.sample import Sample


def f32_bits(x: float) -> int:
    return int(struct.unpack("<I", struct.pack("<f", x))[0])


def same_f32(a: float, b: float) -> bool:
    """Equal as float32 bit patterns; any NaN equals any NaN (payloads are not kept)."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return f32_bits(a) == f32_bits(b)


def same_sample(a: Sample, b: Sample) -> bool:
    return (
        (a.sensor_id, a.seq, a.timestamp_ms, a.label)
        == (b.sensor_id, b.seq, b.timestamp_ms, b.label)
        and len(a.values) == len(b.values)
        and all(same_f32(x, y) for x, y in zip(a.values, b.values, strict=True))
    )


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets (taken modulo len + 1, sorted)."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[i:j] for i, j in itertools.pairwise(bounds)]

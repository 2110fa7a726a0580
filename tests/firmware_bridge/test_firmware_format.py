"""The reference MicroPython firmware's frames decode on the host, bit for bit."""

from __future__ import annotations

import struct
import sys
import types
from pathlib import Path

import pytest
from fedge.firmware_bridge.binary_frames import BinaryDecoder, encode_frame
from fedge.firmware_bridge.sample import Sample

pytestmark = pytest.mark.unit
FIRMWARE = Path(__file__).resolve().parents[2] / "firmware_bridge" / "firmware" / "fedge_sensor.py"


def firmware_frame_function():  # type: ignore[no-untyped-def]
    """The script's own functions, loaded without its main loop or a board."""
    source = FIRMWARE.read_text().split("\nout = sys.stdout.buffer")[0]
    sys.modules.setdefault("machine", types.SimpleNamespace(ADC=lambda pin: pin))  # type: ignore[arg-type]
    namespace: dict = {}
    exec(compile(source, str(FIRMWARE), "exec"), namespace)
    return namespace["frame"]


def test_micropython_frames_decode() -> None:
    frame = firmware_frame_function()
    decoder = BinaryDecoder()
    stream = b"\x00" + b"".join(
        frame(seq, 1000 + 10 * seq, [0.5, 3.25]) for seq in range(70000, 70005)
    )
    got = decoder.feed(stream)
    assert [s.seq for s in got] == [
        70000 & 0xFFFF,
        *range((70000 & 0xFFFF) + 1, (70000 & 0xFFFF) + 5),
    ]
    assert all(s.values == (0.5, 3.25) and s.sensor_id == 1 for s in got)
    assert sum(decoder.faults.values()) == 0
    one = Sample(1, 7, 1234, (struct.unpack("<f", struct.pack("<f", 0.1))[0], 2.0))
    assert frame(7, 1234, list(one.values)) == encode_frame(one)  # the same bytes as the host's

"""1 MB of random bytes through each decoder, and decode throughput (printed, never asserted).

Run with ``-s`` to see the figures. The bridge must keep up with 5,000 samples/s of 8 channels.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Protocol

import pytest
from fedge.firmware_bridge.binary_frames import BinaryDecoder, encode_frame
from fedge.firmware_bridge.sample import Sample
from fedge.firmware_bridge.text_frames import TextDecoder


class Decoder(Protocol):
    def feed(self, data: bytes) -> list[Sample]: ...


pytestmark = pytest.mark.unit

MB = 1 << 20


def random_bytes(seed: int, n: int = MB) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunk", [64, 4096])
def test_one_megabyte_of_random_bytes_binary(chunk: int) -> None:
    data = random_bytes(1)
    decoder = BinaryDecoder()
    t0 = time.perf_counter()
    for i in range(0, len(data), chunk):
        decoder.feed(data[i : i + chunk])
    elapsed = time.perf_counter() - t0
    print(f"\nbinary: 1 MB random in {elapsed * 1000:.0f} ms, faults {dict(decoder.faults)}")
    assert decoder.faults.total() > 1000
    # a frame survives random bytes only with a 1 in 65536 CRC chance and consistent header
    assert decoder.frames <= 5


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunk", [64, 4096])
def test_one_megabyte_of_random_bytes_text(chunk: int) -> None:
    rng = random.Random(2)
    data = random_bytes(2)
    # random bytes rarely contain text: mix in printable noise that looks like sensor lines
    alphabet = b"0123456789.,= -\r\nta"
    noise = bytes(rng.choice(alphabet) for _ in range(MB // 4))
    decoder = TextDecoder(max_line=512)
    t0 = time.perf_counter()
    for blob in (data, noise):
        for i in range(0, len(blob), chunk):
            decoder.feed(blob[i : i + chunk])
    elapsed = time.perf_counter() - t0
    print(f"\ntext: 1.25 MB random in {elapsed * 1000:.0f} ms, faults {dict(decoder.faults)}")
    assert decoder.faults["not_utf8"] > 100
    assert decoder.faults["line_too_long"] > 100


def _rate(make: Callable[[], Decoder], data: bytes, n: int, chunk: int = 4096) -> float:
    """Best of three: samples per second decoding ``data`` (``n`` samples) in ``chunk`` reads."""
    best = 0.0
    for _ in range(3):
        feed = make().feed
        got = 0
        t0 = time.perf_counter()
        for i in range(0, len(data), chunk):
            got += len(feed(data[i : i + chunk]))
        best = max(best, n / (time.perf_counter() - t0))
        assert got == n
    return best


def test_throughput_8_channels() -> None:
    rng = random.Random(3)
    n = 50_000
    items = [
        Sample(1, i & 0xFFFF, 1000 + i, tuple(rng.uniform(-20, 40) for _ in range(8)))
        for i in range(n)
    ]
    binary = b"".join(encode_frame(s) for s in items)
    csv = b"".join((",".join(f"{v:.3f}" for v in s.values) + "\r\n").encode() for s in items)
    kv = b"".join(
        (
            f"seq={s.seq} t={s.timestamp_ms} "
            + " ".join(f"c{j}={v:.3f}" for j, v in enumerate(s.values))
            + "\r\n"
        ).encode()
        for s in items
    )
    channels = [f"c{j}" for j in range(8)]
    rates = {
        "binary (45 B/frame)": _rate(BinaryDecoder, binary, n),
        "text CSV": _rate(TextDecoder, csv, n),
        "text key=value": _rate(lambda: TextDecoder(channels=channels), kv, n),
    }
    print()
    for name, rate in rates.items():
        print(f"{name}: {rate:,.0f} samples/s of 8 channels, one core ({rate / 5000:.0f}x 5,000/s)")

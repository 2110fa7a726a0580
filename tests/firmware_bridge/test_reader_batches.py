"""The reader hands samples over in batches: by age, by count, and at once on loss or stop."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import pytest
import serial
from fedge.firmware_bridge.reader import SerialReader

pytestmark = pytest.mark.unit


class Bytes:
    """A stand-in decoder: every byte is a sample."""

    def feed(self, data: bytes) -> Sequence[int]:
        return list(data)


class ScriptedPort:
    """Each read takes ``step`` seconds of a fake clock and returns the next scripted bytes;
    ``None`` in the script is the port failing. At the end of the script it sets ``stop``."""

    def __init__(self, script: list[bytes | None], clock: list[float], stop: threading.Event):
        self.script, self.clock, self.stop = list(script), clock, stop

    def read(self, size: int) -> bytes:
        self.clock[0] += 0.1
        if not self.script:
            self.stop.set()
            return b""
        data = self.script.pop(0)
        if data is None:
            self.stop.set()  # one connection is enough for these tests
            raise serial.SerialException("device disconnected")
        return data

    def close(self) -> None:
        pass


def run(
    script: list[bytes | None], **kw: float
) -> tuple[list[tuple[float, list[int]]], SerialReader]:
    """Run a reader over ``script``; return (fake time, samples) of every hand-over."""
    clock = [0.0]
    stop = threading.Event()
    port = ScriptedPort(script, clock, stop)
    got: list[tuple[float, list[int]]] = []
    opener: Callable[..., ScriptedPort] = lambda *a, **k: port  # noqa: E731
    reader = SerialReader(
        "fake",
        9600,
        Bytes(),
        on_samples=lambda s: got.append((round(clock[0], 3), list(s))),
        open_port=opener,
        clock=lambda: clock[0],
        **kw,  # type: ignore[arg-type]
    )
    reader.run(stop)
    return got, reader


def test_reads_are_held_until_the_oldest_is_flush_every_old() -> None:
    # reads end at 0.1, 0.2, ...: samples at 0.1 (x2), 0.3, 0.5, 0.7, then nothing
    got, reader = run([b"ab", b"", b"c", b"", b"d", b"", b"e"], flush_every=0.35)
    assert got == [(0.5, [97, 98, 99, 100]), (0.8, [101])]  # the last one: at stop
    assert reader.counters["batches"] == 2 and reader.counters["samples"] == 5


def test_a_full_batch_goes_at_once() -> None:
    got, _ = run([b"abc", b"de", b"f"], flush_every=60.0, flush_samples=4)
    assert got == [(0.2, list(b"abcde")), (0.4, list(b"f"))]


def test_what_was_read_is_handed_over_when_the_port_is_lost() -> None:
    got, reader = run([b"ab", b"c", None], flush_every=60.0)
    assert got == [(0.3, list(b"abc"))]
    assert reader.counters["disconnects"] == 1


def test_flush_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        SerialReader("fake", 9600, Bytes(), on_samples=print, flush_samples=0)
    with pytest.raises(ValueError):
        SerialReader("fake", 9600, Bytes(), on_samples=print, flush_every=-1.0)


def test_held_counts_samples_until_they_are_stored() -> None:
    clock = [0.0]
    stop = threading.Event()
    port = ScriptedPort([b"ab", b"c"], clock, stop)
    seen: list[int] = []
    reader: SerialReader | None = None

    def store(samples: Sequence[int]) -> None:
        assert reader is not None
        seen.append(reader.held)  # still held while the store writes them

    opener: Callable[..., ScriptedPort] = lambda *a, **k: port  # noqa: E731
    reader = SerialReader(
        "fake", 9600, Bytes(), on_samples=store, open_port=opener, clock=lambda: clock[0]
    )
    reader.run(stop)
    assert seen == [3] and reader.held == 0

"""Read a microcontroller's serial port with pyserial, surviving unplug and replug.

The reader owns one thread: it opens the port, hands every chunk of bytes to a decoder
(text or binary frames) and the decoded samples to a callback, and when the port fails
(unplugged, reset, permissions) it closes it and retries with exponential backoff until it
reappears. Counters say what happened, for logs and metrics::

    reader = SerialReader("/dev/ttyACM0", 115200, BinaryDecoder(), on_samples=store.append)
    threading.Thread(target=reader.run, args=(stop,), daemon=True).start()

Batches. A read returns what arrived within 0.1 s (at most ``read_size`` bytes). The samples
of successive reads are held and handed to ``on_samples`` together, one call (one store
transaction) once the oldest held sample is ``flush_every`` seconds old (0.5 s) or
``flush_samples`` are held (10,000), and at once when the port is lost or ``stop`` is set.
A process killed in between loses what is held (``held`` says how many samples that is): at
most ``flush_every`` + 0.1 s of samples, which the firmware's sequence numbers show as a gap in
the store.

Any pyserial URL works as the port (``loop://`` in tests, ``rfc2217://`` for a remote port).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import serial

from .sample import join_samples

log = logging.getLogger("fedge.firmware_bridge")


class Decoder(Protocol):
    def feed(self, data: bytes) -> Sequence[Any]: ...


class SerialReader:
    def __init__(
        self,
        port: str,
        baudrate: int,
        decoder: Decoder,
        *,
        on_samples: Callable[[Sequence[Any]], None],
        backoff: tuple[float, float] = (0.5, 30.0),
        read_size: int = 65536,
        flush_every: float = 0.5,
        flush_samples: int = 10_000,
        open_port: Callable[..., Any] = serial.serial_for_url,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if flush_every < 0 or flush_samples < 1:
            raise ValueError(f"flush_every {flush_every} s, flush_samples {flush_samples}")
        self.port = port
        self.baudrate = baudrate
        self.decoder = decoder
        self.on_samples = on_samples
        self.backoff = backoff
        self.read_size = read_size
        self.flush_every = flush_every
        self.flush_samples = flush_samples
        self._open = open_port
        self._clock = clock
        self.counters: Counter[str] = Counter()  # bytes, samples, batches, opens, ...
        self.connected = threading.Event()
        self._held: list[Sequence[Any]] = []
        self._held_count = 0
        self._held_since = 0.0  # clock() when the oldest held sample was read

    @property
    def held(self) -> int:
        """Samples decoded and not yet handed to ``on_samples`` (what a crash would lose)."""
        return self._held_count

    def run(self, stop: threading.Event) -> None:
        """Read until ``stop`` is set; never raises for a port that comes and goes."""
        delay = self.backoff[0]
        while not stop.is_set():
            try:
                port = self._open(self.port, baudrate=self.baudrate, timeout=0.1)
            except (serial.SerialException, OSError, ValueError) as exc:
                self.counters["open_failures"] += 1
                if self.counters["open_failures"] == 1 or delay >= self.backoff[1]:
                    log.warning("%s: cannot open (%s); retrying in %.1fs", self.port, exc, delay)
                stop.wait(delay)
                delay = min(delay * 2, self.backoff[1])
                continue
            self.counters["opens"] += 1
            self.connected.set()
            log.info("%s: open at %d baud", self.port, self.baudrate)
            delay = self.backoff[0]
            try:
                self._pump(port, stop)
            except (serial.SerialException, OSError) as exc:
                self.counters["disconnects"] += 1
                log.warning("%s: lost (%s); waiting for it to come back", self.port, exc)
            finally:
                self.connected.clear()
                # The device may be gone already; there is nothing left to release then.
                with contextlib.suppress(serial.SerialException, OSError):
                    port.close()

    def _pump(self, port: Any, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                data = port.read(self.read_size)
                if data:
                    self.counters["bytes"] += len(data)
                    samples = self.decoder.feed(bytes(data))
                    if samples:
                        self._hold(samples)
                        self.counters["samples"] += len(samples)
                if self._held_count and (
                    self._held_count >= self.flush_samples
                    or self._clock() - self._held_since >= self.flush_every
                ):
                    self._flush()
        finally:  # the port is gone or we stop: what was read is still worth storing
            self._flush()

    def _hold(self, samples: Sequence[Any]) -> None:
        if not self._held_count:
            self._held_since = self._clock()
        self._held.append(samples)
        self._held_count += len(samples)

    def _flush(self) -> None:
        if not self._held_count:
            return
        held, self._held = self._held, []
        self.counters["batches"] += 1
        try:
            self.on_samples(join_samples(held))
        finally:  # held until stored: another thread may wait for them to be
            self._held_count = 0

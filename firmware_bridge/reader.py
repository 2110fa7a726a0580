"""Read a microcontroller's serial port with pyserial, surviving unplug and replug.

The reader owns one thread: it opens the port, hands every chunk of bytes to a decoder
(text or binary frames) and the decoded samples to a callback, and when the port fails
(unplugged, reset, permissions) it closes it and retries with exponential backoff until it
reappears. Counters say what happened, for logs and metrics::

    reader = SerialReader("/dev/ttyACM0", 115200, BinaryDecoder(), on_samples=store.append)
    threading.Thread(target=reader.run, args=(stop,), daemon=True).start()

Any pyserial URL works as the port (``loop://`` in tests, ``rfc2217://`` for a remote port).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import serial

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
        read_size: int = 4096,
        open_port: Callable[..., Any] = serial.serial_for_url,
    ) -> None:
        self.port = port
        self.baudrate = baudrate
        self.decoder = decoder
        self.on_samples = on_samples
        self.backoff = backoff
        self.read_size = read_size
        self._open = open_port
        self.counters: Counter[str] = Counter()
        self.connected = threading.Event()

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
        while not stop.is_set():
            data = port.read(self.read_size)
            if not data:
                continue
            self.counters["bytes"] += len(data)
            samples = self.decoder.feed(bytes(data))
            if samples:
                self.counters["samples"] += len(samples)
                self.on_samples(samples)

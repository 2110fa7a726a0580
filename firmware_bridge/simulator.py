"""A sensor on a pseudo-terminal: a machine that slowly wears out, for demos and tests.

:class:`Machine` generates what a microcontroller on a motor or a pump would read, at a fixed
rate: three vibration axes (g) whose amplitude grows as a bearing wears, a temperature (C)
that follows the wear with a lag, and the motor current (A). Noise is Gaussian; now and then
a fault happens (a spike on one channel, a stuck reading, a dropped frame), as on real
hardware. Everything comes from one seeded generator, so a run can be repeated.

:func:`serve_pty` writes the stream as binary frames (or text lines) to the master side of a
pseudo-terminal; whatever opens the slave side (the agent's serial reader) sees a serial port.
:func:`replay_csv` plays back recorded readings instead.
"""

from __future__ import annotations

import csv
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .sample import Sample

CHANNELS = ("vib_x", "vib_y", "vib_z", "temp_c", "current_a")


@dataclass
class Machine:
    seed: int = 0
    rate_hz: float = 100.0
    wear_per_hour: float = 0.5  # relative growth of the vibration amplitude per hour
    fault_rate: float = 0.001  # chance per sample of a fault (spike, stuck, dropped)
    sensor_id: int = 1
    rng: np.random.Generator = field(init=False)
    _n: int = field(default=0, init=False)
    _stuck: tuple[float, ...] | None = field(default=None, init=False)
    _stuck_left: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def reading(self, t: float) -> tuple[float, ...]:
        wear = 1.0 + self.wear_per_hour * t / 3600.0
        spin = 2 * math.pi * 24.0 * t  # a 1,440 rpm shaft
        noise = self.rng.normal(0.0, 0.02, 5)
        vib = [0.1 * wear * math.sin(spin + phase) for phase in (0.0, 2.1, 4.2)]
        temp = 40.0 + 8.0 * (wear - 1.0) + 0.5 * math.sin(2 * math.pi * t / 600.0)
        current = 3.0 + 0.2 * (wear - 1.0) + 0.05 * math.sin(spin / 24.0)
        return tuple(float(v) for v in np.array([*vib, temp, current]) + noise)

    def samples(self) -> Iterator[Sample | None]:
        """Samples forever; ``None`` marks a dropped frame (a gap in the sequence)."""
        while True:
            t = self._n / self.rate_hz
            seq, ts = self._n & 0xFFFF, int(t * 1000) & 0xFFFFFFFF
            self._n += 1
            values = self.reading(t)
            if self._stuck_left:
                self._stuck_left -= 1
                values = self._stuck or values
            elif self.rng.random() < self.fault_rate:
                kind = self.rng.integers(3)
                if kind == 0:  # a spike on one channel
                    spiked = list(values)
                    spiked[int(self.rng.integers(len(spiked)))] *= 20.0
                    values = tuple(spiked)
                elif kind == 1:  # the ADC sticks for a while
                    self._stuck, self._stuck_left = values, int(self.rng.integers(5, 50))
                else:  # the frame is lost
                    yield None
                    continue
            yield Sample(self.sensor_id, seq, ts, values)


def replay_csv(path: Path, sensor_id: int = 1) -> Iterator[Sample]:
    """Recorded readings: a CSV with a header, every column a channel, one row per sample."""
    with path.open(newline="") as fh:
        rows = csv.reader(fh)
        next(rows, None)
        for n, row in enumerate(rows):
            yield Sample(sensor_id, n & 0xFFFF, None, tuple(float(v) for v in row))


def open_pty(link: Path | None = None) -> tuple[int, str]:
    """A pseudo-terminal pair: (master fd, path of the slave, or ``link`` pointing to it)."""
    import tty

    master, slave = os.openpty()
    tty.setraw(slave)
    # A UART does not wait for a listener: with nobody reading, frames are dropped, not queued.
    os.set_blocking(master, False)
    path = os.ttyname(slave)
    os.close(slave)
    if link is not None:
        tmp = link.with_name(link.name + ".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(path)
        os.replace(tmp, link)
        path = str(link)
    return master, path


def serve_pty(
    master: int,
    samples: Iterator[Sample | None],
    encode: Callable[[Sample], bytes],
    *,
    rate_hz: float,
    stop: threading.Event,
    limit: int | None = None,
) -> int:
    """Write ``samples`` to the pty at ``rate_hz`` until ``stop`` or ``limit``; returns how many."""
    sent = 0
    start = time.monotonic()
    for sample in samples:
        if stop.is_set() or (limit is not None and sent >= limit):
            break
        if sample is not None:
            try:
                os.write(master, encode(sample))
            except OSError:  # nobody reads the other side (yet): the kernel buffer is full
                stop.wait(0.05)
        sent += 1
        ahead = start + sent / rate_hz - time.monotonic()
        if ahead > 0:
            stop.wait(ahead)
    return sent

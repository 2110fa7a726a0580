"""Sequence-number tracking per sensor: gaps, duplicates and restarts, with wrap-around.

The firmware numbers its frames modulo ``modulus`` (binary frames: u16, so 65536). For each
sensor the tracker remembers the last number seen and classifies the next one by its forward
distance ``d = (seq - last) mod modulus``:

    d == 1                  in order
    d == 0                  ``duplicate`` (the caller drops the sample)
    1 < d <= modulus / 2    ``seq_gap``: d - 1 frames were lost, counted as d - 1
    d > modulus / 2         ``seq_reset``: the number went backwards (the MCU restarted);
                            counted once, tracking restarts from the new number

With a u16 counter at 5,000 frames/s the counter wraps every 13 s, so an outage longer than
about 6.5 s is indistinguishable from a restart and counts as ``seq_reset``.

``check_many`` classifies a whole run of numbers at once (numpy, no Python work per number)
and leaves the tracker as ``check`` called on each in turn would.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Verdict = Literal["ok", "first", "gap", "duplicate", "reset"]


def distinct(a: np.ndarray) -> list[int]:
    """The distinct values of ``a``, ascending (``np.unique`` without its first-call import)."""
    if len(a) == 0:
        return []
    if (a == a[0]).all():
        return [int(a[0])]
    s = np.sort(a)
    return s[np.concatenate(([True], s[1:] != s[:-1]))].tolist()  # type: ignore[no-any-return]


class SeqTracker:
    """Last sequence number per sensor; ``check`` classifies the next one."""

    def __init__(self, modulus: int = 1 << 16) -> None:
        if modulus < 2:
            raise ValueError(f"modulus must be >= 2, got {modulus}")
        self.modulus = modulus
        self._half = modulus // 2
        self._last: dict[int, int] = {}

    def check(self, sensor_id: int, seq: int) -> tuple[Verdict, int]:
        """Return (verdict, frames missed) and remember ``seq`` unless it is a duplicate."""
        last = self._last.get(sensor_id)
        seq %= self.modulus
        if last is None:
            self._last[sensor_id] = seq
            return "first", 0
        d = (seq - last) % self.modulus
        if d == 1:
            self._last[sensor_id] = seq
            return "ok", 0
        if d == 0:
            return "duplicate", 0
        self._last[sensor_id] = seq
        if d <= self._half:
            return "gap", d - 1
        return "reset", 0

    def check_many(
        self, sensor_ids: np.ndarray, seqs: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``check`` over numbers in arrival order: (duplicate mask, frames missed, reset mask).

        ``missed[i] > 0`` is a gap of that many frames before number ``i``; a number that is
        none of the three is in order or the first of its sensor.
        """
        sensor_ids = np.asarray(sensor_ids, np.int64)
        seqs = np.asarray(seqs, np.int64) % self.modulus
        duplicate = np.zeros(len(seqs), bool)
        missed = np.zeros(len(seqs), np.int64)
        reset = np.zeros(len(seqs), bool)
        if len(seqs) == 0:
            return duplicate, missed, reset
        sensors = distinct(sensor_ids)
        for sensor in sensors:
            idx = (
                np.arange(len(seqs)) if len(sensors) == 1 else np.flatnonzero(sensor_ids == sensor)
            )
            own = seqs[idx]
            # The number before each is the previous one of the sensor whatever its verdict:
            # a duplicate equals the number it repeats, which is where tracking stays.
            last = self._last.get(sensor)
            if last is None:
                prev, idx, cur = own[:-1], idx[1:], own[1:]  # the first one has no verdict
            else:
                prev, cur = np.concatenate(([last], own[:-1])), own
            d = (cur - prev) % self.modulus
            duplicate[idx] = d == 0
            gap = (d > 1) & (d <= self._half)
            missed[idx] = np.where(gap, d - 1, 0)
            reset[idx] = d > self._half
            self._last[sensor] = int(own[-1])
        return duplicate, missed, reset

    def forget(self, sensor_id: int | None = None) -> None:
        """Forget one sensor (or all): its next number is taken as the first."""
        if sensor_id is None:
            self._last.clear()
        else:
            self._last.pop(sensor_id, None)

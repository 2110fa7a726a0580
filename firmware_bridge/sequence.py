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
"""

from __future__ import annotations

from typing import Literal

Verdict = Literal["ok", "first", "gap", "duplicate", "reset"]


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

    def forget(self, sensor_id: int | None = None) -> None:
        """Forget one sensor (or all): its next number is taken as the first."""
        if sensor_id is None:
            self._last.clear()
        else:
            self._last.pop(sensor_id, None)

"""When the next round may start: an interval between round starts, a daily window (pure).

Devices often may train only at some hours (at night, on mains power, off the metered link):
a ``window`` of local time, which may wrap midnight ("22:00-06:00"), holds every round
start. A round is only *started* inside the window; one still open when the window ends
runs to its own deadline (cutting it off would waste what its devices already trained).
Local time is the ``timezone``'s (an IANA name) or, without one, the machine's, so the
window follows daylight saving time: 22:00 stays 22:00 on the day the clocks change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, tzinfo

_WINDOW = re.compile(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)")


def parse_window(text: str) -> tuple[time, time]:
    """``"HH:MM-HH:MM"`` as (start, end); ValueError with one line for anything else."""
    m = _WINDOW.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"window {text!r}: want HH:MM-HH:MM, e.g. 22:00-06:00")
    start, end = time(int(m[1]), int(m[2])), time(int(m[3]), int(m[4]))
    if start == end:
        raise ValueError(f"window {text!r}: start and end are the same (leave it out: always)")
    return start, end


@dataclass(frozen=True)
class Schedule:
    """``interval`` seconds between round starts (0: back to back) and an optional daily
    ``window`` (start, end) of local time in ``tz`` (None: the machine's local time)."""

    interval: float = 0.0
    window: tuple[time, time] | None = None
    tz: tzinfo | None = None

    def next_start(self, now: float, last_start: float | None) -> float:
        """The earliest time (unix seconds, ``>= now``) at which the next round may start,
        given when the last one started (None: no round yet)."""
        earliest = now if last_start is None else max(now, last_start + self.interval)
        if self.window is None or self._inside(earliest):
            return earliest
        day = datetime.fromtimestamp(earliest, self.tz).date()
        today = self._at(day, self.window[0])
        return today if today > earliest else self._at(day + timedelta(days=1), self.window[0])

    def _inside(self, ts: float) -> bool:
        assert self.window is not None
        start, end = self.window
        t = datetime.fromtimestamp(ts, self.tz).time()
        return start <= t < end if start < end else (t >= start or t < end)

    def _at(self, day: date, hhmm: time) -> float:
        return datetime.combine(day, hhmm, tzinfo=self.tz).timestamp()

    def describe(self) -> str:
        """What an operator reads in the log: "window 22:00-06:00, every 3600 s"."""
        parts = []
        if self.window is not None:
            parts.append(f"window {self.window[0]:%H:%M}-{self.window[1]:%H:%M}")
        if self.interval:
            parts.append(f"every {self.interval:g} s")
        return ", ".join(parts) or "back to back"

    def local(self, ts: float, now: float) -> str:
        """``ts`` as local time of day, with its date when that is not ``now``'s."""
        when = datetime.fromtimestamp(ts, self.tz)
        today = datetime.fromtimestamp(now, self.tz).date()
        return f"{when:%H:%M}" if when.date() == today else f"{when:%Y-%m-%d %H:%M}"

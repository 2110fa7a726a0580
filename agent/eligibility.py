"""Whether this device should train, and upload, right now.

Three parts, kept apart so the decision can be tested without a device::

    read_readings(root)  -> Readings      sysfs + load average; never raises
    ByteBudget                           bytes sent in the last 24 h (persisted in the state file)
    decide(cfg, readings, budget, n)     -> Decision(train, upload, reason)    no I/O

Readings and their fallbacks
----------------------------
- Power, from ``/sys/class/power_supply/*``: on mains if any supply of type ``Mains`` or
  ``USB`` reports ``online`` = 1; otherwise on battery if a system battery (type ``Battery``,
  not ``scope`` = ``Device``, which is a mouse or a headset) is present, with its ``capacity``
  in percent (or ``energy_now/energy_full``, ``charge_now/charge_full``). With no such
  entries - a Raspberry Pi on a wall adapter has none at all - power is *unknown*, and
  :attr:`EligibilityConfig.unknown_power_is_mains` (default True) treats it as mains: most
  fleet devices without a battery the kernel can see are wired to the mains, and a policy
  that refused them would stop every Pi in the fleet. Set it to False for battery devices
  whose fuel gauge the kernel does not expose (HATs with their own I2C gauge).
- CPU temperature, from ``/sys/class/thermal/thermal_zone*/temp`` (millidegrees C): the
  hottest zone whose ``type`` names the CPU or SoC (``cpu-thermal`` on a Pi, ``x86_pkg_temp``
  on Intel, ``soc_thermal`` on phones), else the hottest zone of any type. None readable:
  unknown, which allows training.
- Load, ``os.getloadavg()[0] / os.cpu_count()``: unavailable means unknown, which allows.
  Linux counts tasks waiting on disk in the load average, so a Pi stuck on a slow SD card
  reads as busy too; that is intended.

A missing file is normal and is logged once (at INFO) per kind; a file that exists but
holds something unparsable is *garbled*: the value is unknown, the problem is counted in
:class:`ReadingLog` and logged once (WARNING) per kind.

The decision
------------
Checked in this order; the first that forbids gives the reason (train, upload)::

    battery_low        no   no    on battery below min_battery_percent
    battery_unknown    no   no    on battery, level unreadable
    power_unknown      no   no    power unknown and unknown_power_is_mains is False
    too_hot            no   no    CPU at or above max_cpu_temp_c
    busy               no   no    1-minute load per CPU at or above max_load_per_cpu
    budget_exhausted   yes  no    the upload estimate does not fit the 24 h byte budget
    ok                 yes  yes

Power, heat and load protect the device, so they stop training itself. The byte budget
protects only the link: training costs no bytes, so with the budget spent the device still
trains, so that an update pipeline with a residual (error feedback: the part of a delta not
yet sent) carries this round's progress into the round when it may upload again; it sends
only the skip notice. Without such a residual, training-only rounds are wasted work and the
caller may treat ``budget_exhausted`` as a full skip.
A battery whose level cannot be read is not assumed full: the device is known not to be on
mains, which is exactly the case the battery threshold exists for.

The byte budget is a rolling 24 h window rather than a reset at local midnight: it needs no
time zone (many Pis run in UTC), it bounds the bytes sent in *any* 24 hours (a midnight
reset lets a device spend two days' allowance in the minutes around midnight), and there
is no reset for a restart to miss. A clock stepped forward ages records early (the budget
loosens by at most the step); one stepped back is handled in :class:`ByteBudget`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("fedge.agent")

Reason = Literal[
    "ok",
    "battery_low",
    "battery_unknown",
    "power_unknown",
    "too_hot",
    "busy",
    "budget_exhausted",
]
REASONS: tuple[Reason, ...] = get_args(Reason)

DAY_S = 24 * 3600.0
_MAINS_TYPES = {"mains", "usb"}
_CPU_ZONE_HINTS = ("cpu", "soc", "x86_pkg_temp")
_TEMP_RANGE_C = (-50.0, 200.0)  # outside this a zone is reporting an error, not a temperature


class EligibilityConfig(BaseModel):
    """The ``[eligibility]`` table of the agent config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_battery_percent: float = Field(default=30, ge=0, le=100)
    max_cpu_temp_c: float = Field(default=75, gt=0, le=150)
    # Generous: a Pi running a few services sits well below 1; 2 means a queue twice the cores.
    max_load_per_cpu: float = Field(default=2.0, gt=0)
    daily_upload_bytes: int | None = Field(default=None, ge=0)  # None: unmetered
    unknown_power_is_mains: bool = True


@dataclass(frozen=True)
class Readings:
    """What the device could read about itself; None means unknown."""

    on_mains: bool | None = None
    battery_percent: float | None = None  # only meaningful when on_mains is False
    cpu_temp_c: float | None = None
    load_per_cpu: float | None = None


@dataclass(frozen=True)
class Decision:
    train: bool
    upload: bool
    reason: Reason  # short and stable: sent as SkipNotice.reason and counted in metrics


# -- the byte budget ----------------------------------------------------------------------


class ByteBudget:
    """Bytes sent in a rolling window (24 h by default), from timestamped records.

    The clock is wall time (``time.time``) because the records outlive a reboot in the state
    file. A record stamped in the future (the clock stepped back, as on a Pi without an RTC
    before NTP syncs) is treated as sent *now*, so it expires at most one window later.
    The number of records is bounded: past ``max_records`` the two oldest merge into one
    carrying the newer stamp, which can only make the budget stricter, never looser.
    """

    def __init__(
        self,
        *,
        window_s: float = DAY_S,
        clock: Callable[[], float] = time.time,
        max_records: int = 1024,
    ) -> None:
        if window_s <= 0 or max_records < 1:
            raise ValueError("window_s must be > 0 and max_records >= 1")
        self.window_s = window_s
        self.clock = clock
        self.max_records = max_records
        self._records: list[tuple[float, int]] = []  # (unix time, bytes), oldest first

    def record(self, nbytes: int) -> None:
        """Note ``nbytes`` sent now."""
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        if nbytes == 0:
            return
        now = self.clock()
        self._prune(now)
        self._records.append((now, nbytes))
        self._bound()

    def used(self) -> int:
        """Bytes sent within the window ending now."""
        self._prune(self.clock())
        return sum(n for _, n in self._records)

    def fits(self, nbytes: int, limit: int | None) -> bool:
        """Whether sending ``nbytes`` now keeps the window at or under ``limit`` (None: yes)."""
        return limit is None or self.used() + nbytes <= limit

    def _prune(self, now: float) -> None:
        cutoff = now - self.window_s
        self._records = [(min(t, now), n) for t, n in self._records if t > cutoff]

    def _bound(self) -> None:
        while len(self._records) > self.max_records:
            (_, b0), (t1, b1) = self._records[0], self._records[1]
            self._records[0:2] = [(t1, b0 + b1)]  # later stamp: expires later, stricter

    def to_dict(self) -> dict[str, Any]:
        """A small JSON-able dict for the agent's state file."""
        self._prune(self.clock())
        return {"window_s": self.window_s, "sent": [[t, n] for t, n in self._records]}

    @classmethod
    def from_dict(
        cls,
        raw: Any,
        *,
        clock: Callable[[], float] = time.time,
        max_records: int = 1024,
    ) -> ByteBudget:
        """Rebuild from :meth:`to_dict`; raises ValueError on anything else.

        The caller should log the error and start from an empty budget, which can at worst
        let one extra window's worth of bytes through.
        """
        try:
            window_s = float(raw["window_s"])
            sent = [(float(t), int(n)) for t, n in raw["sent"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a byte budget: {exc!r}") from exc
        if not math.isfinite(window_s) or any(not math.isfinite(t) or n < 0 for t, n in sent):
            raise ValueError("byte budget has a non-finite time or a negative count")
        budget = cls(window_s=window_s, clock=clock, max_records=max_records)
        for t, n in sorted(sent):
            if n:
                budget._records.append((t, n))
        budget._prune(clock())
        budget._bound()
        return budget


# -- the decision -------------------------------------------------------------------------


def decide(
    cfg: EligibilityConfig,
    readings: Readings,
    budget: ByteBudget | None,
    upload_bytes_estimate: int,
) -> Decision:
    """Train and upload, train only, or neither; see the module docstring for the order.

    No I/O: the budget's injected clock is the only input besides the arguments. A None
    budget means nothing has been sent yet.
    """
    if upload_bytes_estimate < 0:
        raise ValueError("upload_bytes_estimate must be >= 0")
    no = _device_says_no(cfg, readings)
    if no is not None:
        return Decision(train=False, upload=False, reason=no)
    budget = budget if budget is not None else ByteBudget()
    if not budget.fits(upload_bytes_estimate, cfg.daily_upload_bytes):
        return Decision(train=True, upload=False, reason="budget_exhausted")
    return Decision(train=True, upload=True, reason="ok")


def _device_says_no(cfg: EligibilityConfig, r: Readings) -> Reason | None:
    if r.on_mains is False:
        if r.battery_percent is None:
            return "battery_unknown"
        if r.battery_percent < cfg.min_battery_percent:
            return "battery_low"
    elif r.on_mains is None and not cfg.unknown_power_is_mains:
        return "power_unknown"
    if r.cpu_temp_c is not None and r.cpu_temp_c >= cfg.max_cpu_temp_c:
        return "too_hot"
    if r.load_per_cpu is not None and r.load_per_cpu >= cfg.max_load_per_cpu:
        return "busy"
    return None


# -- reading the device -------------------------------------------------------------------


@dataclass
class ReadingLog:
    """Counts unreadable readings by kind, and logs each kind once.

    Kinds: ``power_missing``, ``thermal_missing``, ``load_missing`` (normal on some
    devices; INFO) and ``power_garbled``, ``battery_garbled``, ``thermal_garbled``,
    ``load_garbled`` (WARNING).
    """

    counts: Counter[str] = field(default_factory=Counter)
    _logged: set[str] = field(default_factory=set, init=False, repr=False)

    def note(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        if kind in self._logged:
            return
        self._logged.add(kind)
        level = logging.WARNING if kind.endswith("_garbled") else logging.INFO
        log.log(level, "eligibility: %s (%s); treating it as unknown", kind, detail)


_DEFAULT_LOG = ReadingLog()


def read_readings(
    root: Path = Path("/"),
    loadavg: Callable[[], tuple[float, float, float]] = os.getloadavg,
    cpu_count: Callable[[], int | None] = os.cpu_count,
    problems: ReadingLog | None = None,
) -> Readings:
    """Read power, CPU temperature and load. Never raises; unreadable values are None."""
    problems = problems if problems is not None else _DEFAULT_LOG
    on_mains, battery = _read_power(root / "sys/class/power_supply", problems)
    return Readings(
        on_mains=on_mains,
        battery_percent=battery,
        cpu_temp_c=_read_cpu_temp(root / "sys/class/thermal", problems),
        load_per_cpu=_read_load(loadavg, cpu_count, problems),
    )


def _read_text(path: Path) -> str | None:
    """The stripped contents, or None if the file cannot be read (absent, EIO, ENODATA...)."""
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def _read_number(path: Path) -> float | None:
    text = _read_text(path)
    if text is None:
        return None
    value = float(text)  # ValueError for garbage; the caller counts it
    if not math.isfinite(value):
        raise ValueError(f"not finite: {text!r}")
    return value


def _subdirs(folder: Path) -> Iterator[Path]:
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.is_dir():  # sysfs entries are symlinks to folders; is_dir follows them
            yield entry


def _read_power(folder: Path, problems: ReadingLog) -> tuple[bool | None, float | None]:
    any_mains = False
    batteries: list[float | None] = []
    for supply in _subdirs(folder):
        kind = (_read_text(supply / "type") or "").lower()
        if kind in _MAINS_TYPES:
            online = _read_text(supply / "online")
            if online == "1":
                return True, None
            if online not in ("0", None):
                problems.note("power_garbled", f"{supply / 'online'}: {online!r}")
            any_mains = True
        elif kind == "battery":
            if (_read_text(supply / "scope") or "").lower() == "device":
                continue  # a peripheral's battery (mouse, headset), not ours
            if _read_text(supply / "present") == "0":
                continue  # an empty battery bay
            batteries.append(_battery_percent(supply, problems))
    if batteries:
        known = [b for b in batteries if b is not None]
        return False, (sum(known) / len(known) if known else None)
    if not any_mains:
        problems.note("power_missing", f"no mains or battery entries under {folder}")
    # Mains supplies that all say offline, and no battery: something we cannot see powers
    # the device (a Pi's PoE HAT, a UPS), so the power source is unknown, not "battery".
    return None, None


def _battery_percent(supply: Path, problems: ReadingLog) -> float | None:
    try:
        capacity = _read_number(supply / "capacity")
        if capacity is not None:
            if not 0 <= capacity <= 100:
                raise ValueError(f"capacity {capacity} outside 0..100")
            return capacity
        for now_name, full_name in (("energy_now", "energy_full"), ("charge_now", "charge_full")):
            now = _read_number(supply / now_name)
            full = _read_number(supply / full_name)
            if now is not None and full is not None:
                if full <= 0 or now < 0:
                    raise ValueError(f"{now_name}={now}, {full_name}={full}")
                return min(100.0, 100.0 * now / full)
    except ValueError as exc:
        problems.note("battery_garbled", f"{supply}: {exc}")
        return None
    problems.note("battery_garbled", f"{supply}: no capacity, energy or charge files")
    return None


def _read_cpu_temp(folder: Path, problems: ReadingLog) -> float | None:
    preferred: list[float] = []
    others: list[float] = []
    for zone in _subdirs(folder):
        if not zone.name.startswith("thermal_zone"):
            continue  # cooling_device*: fans and throttles, not sensors
        try:
            milli = _read_number(zone / "temp")
        except ValueError as exc:
            problems.note("thermal_garbled", f"{zone / 'temp'}: {exc}")
            continue
        if milli is None:
            continue  # unreadable right now (some drivers return ENODATA when idle)
        celsius = milli / 1000.0
        if not _TEMP_RANGE_C[0] <= celsius <= _TEMP_RANGE_C[1]:
            problems.note("thermal_garbled", f"{zone / 'temp'}: {milli:g} millidegrees")
            continue
        kind = (_read_text(zone / "type") or "").lower()
        (preferred if any(h in kind for h in _CPU_ZONE_HINTS) else others).append(celsius)
    temps = preferred or others
    if not temps:
        problems.note("thermal_missing", f"no readable thermal zone under {folder}")
        return None
    return max(temps)


def _read_load(
    loadavg: Callable[[], tuple[float, float, float]],
    cpu_count: Callable[[], int | None],
    problems: ReadingLog,
) -> float | None:
    try:
        one_minute = float(loadavg()[0])
    except OSError as exc:
        problems.note("load_missing", f"load average unavailable: {exc}")
        return None
    except (TypeError, ValueError, IndexError) as exc:
        problems.note("load_garbled", f"load average: {exc!r}")
        return None
    cpus = cpu_count()
    if not cpus or cpus < 1:
        problems.note("load_missing", "CPU count unknown")
        return None
    if not math.isfinite(one_minute) or one_minute < 0:
        problems.note("load_garbled", f"load average {one_minute}")
        return None
    return one_minute / cpus

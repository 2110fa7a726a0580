"""When rounds may start: intervals and daily windows, with fixed clocks (pure)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from fedge.aggregator.config import AggregatorConfig
from fedge.aggregator.schedule import Schedule, parse_window
from helpers import DIGITS_MODEL
from pydantic import ValidationError

pytestmark = pytest.mark.unit

BERLIN = ZoneInfo("Europe/Berlin")


def at(text: str, tz: ZoneInfo = BERLIN) -> float:
    """Unix seconds of a local time, e.g. "2026-12-01 23:30"."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=tz).timestamp()


def local(ts: float, tz: ZoneInfo = BERLIN) -> str:
    return f"{datetime.fromtimestamp(ts, tz):%Y-%m-%d %H:%M}"


def night(interval: float = 0.0) -> Schedule:
    return Schedule(interval=interval, window=parse_window("22:00-06:00"), tz=BERLIN)


def test_back_to_back_by_default() -> None:
    assert Schedule().next_start(500.0, None) == 500.0
    assert Schedule().next_start(500.0, 499.9) == 500.0


def test_an_interval_counts_from_the_last_round_start() -> None:
    hourly = Schedule(interval=3600)
    assert hourly.next_start(1000.0, None) == 1000.0  # the first round at once
    assert hourly.next_start(1000.0, 900.0) == 4500.0
    assert hourly.next_start(9000.0, 900.0) == 9000.0  # overdue: now


def test_a_window_that_wraps_midnight() -> None:
    s = night()
    assert local(s.next_start(at("2026-12-01 14:00"), None)) == "2026-12-01 22:00"
    assert local(s.next_start(at("2026-12-01 23:30"), None)) == "2026-12-01 23:30"
    assert local(s.next_start(at("2026-12-02 03:00"), None)) == "2026-12-02 03:00"
    assert local(s.next_start(at("2026-12-02 06:00"), None)) == "2026-12-02 22:00"  # end: out


def test_a_window_within_one_day() -> None:
    s = Schedule(window=parse_window("09:30-17:00"), tz=BERLIN)
    assert local(s.next_start(at("2026-12-01 08:00"), None)) == "2026-12-01 09:30"
    assert local(s.next_start(at("2026-12-01 12:00"), None)) == "2026-12-01 12:00"
    assert local(s.next_start(at("2026-12-01 17:00"), None)) == "2026-12-02 09:30"


def test_an_interval_inside_the_window_and_none_past_its_end() -> None:
    s = night(interval=3 * 3600)
    first = s.next_start(at("2026-12-01 22:00"), None)
    second = s.next_start(first, first)
    third = s.next_start(second, second)
    assert [local(t) for t in (first, second, third)] == [
        "2026-12-01 22:00",
        "2026-12-02 01:00",
        "2026-12-02 04:00",
    ]
    # 07:00 is past the window: the next round waits for the evening. (The round that
    # started at 04:00 and is still open at 06:00 runs to its deadline: only starts wait.)
    assert local(s.next_start(third, third)) == "2026-12-02 22:00"


def test_the_window_keeps_its_local_hours_across_a_clock_change() -> None:
    # Europe/Berlin goes from CEST to CET at 03:00 on 2026-10-25: that night is 9 hours long.
    s = night()
    evening = s.next_start(at("2026-10-24 12:00"), None)
    assert local(evening) == "2026-10-24 22:00"
    morning = s.next_start(at("2026-10-25 06:00"), None)  # the window has just closed
    assert local(morning) == "2026-10-25 22:00"
    assert at("2026-10-25 06:00") - evening == 9 * 3600
    # Spring forward (2026-03-29, 02:00 -> 03:00): 02:30 does not exist that night; read
    # with the offset before the change (zoneinfo's fold=0), the window opens at 03:30.
    gap = Schedule(window=parse_window("02:30-05:00"), tz=BERLIN)
    assert local(gap.next_start(at("2026-03-29 01:00"), None)) == "2026-03-29 03:30"


def test_without_a_time_zone_the_machine_s_local_time_is_used() -> None:
    s = Schedule(window=parse_window("22:00-06:00"))
    now = datetime(2026, 12, 1, 14, 0).timestamp()  # naive: the machine's local time
    assert datetime.fromtimestamp(s.next_start(now, None)).strftime("%H:%M") == "22:00"


@pytest.mark.parametrize(
    ("table", "line"),
    [
        ({"window": "22-06"}, "schedule.window: Value error, window '22-06': want HH:MM-HH:MM"),
        ({"window": "25:00-06:00"}, "want HH:MM-HH:MM"),
        ({"window": "06:00-06:00"}, "start and end are the same"),
        ({"timezone": "Mars/Olympus"}, "schedule.timezone: Value error, unknown time zone"),
        ({"interval": -1}, "schedule.interval"),
        ({"every": 60}, "schedule.every"),
    ],
)
def test_a_bad_schedule_is_one_config_error(tmp_path: Path, table: dict, line: str) -> None:
    with pytest.raises(ValidationError) as info:
        AggregatorConfig(model=DIGITS_MODEL, state_dir=tmp_path, schedule=table)  # type: ignore[arg-type]
    from fedge.configfile import describe

    lines = describe(info.value)
    assert len(lines) == 1 and line in lines[0]


def test_the_config_builds_the_schedule(tmp_path: Path) -> None:
    cfg = AggregatorConfig(
        model=DIGITS_MODEL,
        state_dir=tmp_path,
        schedule={"interval": 600, "window": "22:00-06:00", "timezone": "Europe/Berlin"},  # type: ignore[arg-type]
    )
    s = cfg.schedule.build()
    assert s == night(interval=600)
    assert s.describe() == "window 22:00-06:00, every 600 s"
    assert AggregatorConfig(model=DIGITS_MODEL, state_dir=tmp_path).schedule.build() == Schedule()

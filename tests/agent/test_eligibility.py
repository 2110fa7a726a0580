"""Eligibility: readings from fake sysfs trees, the rolling byte budget, and each decision."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fedge.agent.eligibility import (
    DAY_S,
    REASONS,
    ByteBudget,
    Decision,
    EligibilityConfig,
    ReadingLog,
    Readings,
    decide,
    read_readings,
)
from pydantic import ValidationError

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def write(root: Path, rel: str, files: dict[str, str]) -> None:
    folder = root / rel
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text + "\n")


def supply(root: Path, name: str, **files: str) -> None:
    write(root, f"sys/class/power_supply/{name}", files)


def zone(root: Path, n: int, kind: str, temp: str) -> None:
    write(root, f"sys/class/thermal/thermal_zone{n}", {"type": kind, "temp": temp})


def quiet_load() -> tuple[float, float, float]:
    return (0.5, 0.5, 0.5)


def readings(root: Path, log: ReadingLog | None = None, cpus: int = 4) -> Readings:
    return read_readings(root, loadavg=quiet_load, cpu_count=lambda: cpus, problems=log)


# -- power --------------------------------------------------------------------------------


def test_pi_without_power_supply_dir_reads_unknown_and_trains(tmp_path: Path) -> None:
    zone(tmp_path, 0, "cpu-thermal", "48312")
    log = ReadingLog()
    r = readings(tmp_path, log)
    assert r.on_mains is None and r.battery_percent is None
    assert r.cpu_temp_c == pytest.approx(48.312)
    assert log.counts["power_missing"] == 1
    assert decide(EligibilityConfig(), r, None, 100) == Decision(True, True, "ok")
    strict = EligibilityConfig(unknown_power_is_mains=False)
    assert decide(strict, r, None, 100) == Decision(False, False, "power_unknown")


def test_laptop_battery_discharging_at_20_percent_is_too_low(tmp_path: Path) -> None:
    supply(tmp_path, "AC", type="Mains", online="0")
    supply(tmp_path, "BAT0", type="Battery", capacity="20", status="Discharging", present="1")
    r = readings(tmp_path)
    assert (r.on_mains, r.battery_percent) == (False, 20)
    assert decide(EligibilityConfig(), r, None, 0) == Decision(False, False, "battery_low")


def test_laptop_battery_at_80_percent_trains(tmp_path: Path) -> None:
    supply(tmp_path, "AC", type="Mains", online="0")
    supply(tmp_path, "BAT0", type="Battery", capacity="80", status="Discharging")
    r = readings(tmp_path)
    assert (r.on_mains, r.battery_percent) == (False, 80)
    assert decide(EligibilityConfig(), r, None, 0).reason == "ok"


def test_mains_online_wins_over_a_low_battery(tmp_path: Path) -> None:
    supply(tmp_path, "BAT0", type="Battery", capacity="5", status="Charging")
    supply(tmp_path, "ADP1", type="Mains", online="1")
    r = readings(tmp_path)
    assert r.on_mains is True
    assert decide(EligibilityConfig(), r, None, 0).reason == "ok"


def test_usb_charger_online_counts_as_mains(tmp_path: Path) -> None:
    supply(tmp_path, "battery", type="Battery", capacity="12")
    supply(tmp_path, "usb", type="USB", online="1")
    assert readings(tmp_path).on_mains is True


def test_a_mouse_battery_is_not_the_devices_battery(tmp_path: Path) -> None:
    supply(tmp_path, "hidpp_battery_0", type="Battery", scope="Device", capacity="5")
    r = readings(tmp_path)
    assert r.on_mains is None  # a Pi with a wireless mouse is still a mains Pi
    assert decide(EligibilityConfig(), r, None, 0).reason == "ok"


def test_battery_level_from_energy_files_when_capacity_is_absent(tmp_path: Path) -> None:
    supply(tmp_path, "BAT1", type="Battery", energy_now="25000000", energy_full="50000000")
    assert readings(tmp_path).battery_percent == pytest.approx(50.0)


def test_garbled_battery_is_counted_once_logged_once_and_not_assumed_full(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    supply(tmp_path, "BAT0", type="Battery", capacity="banana")
    log = ReadingLog()
    with caplog.at_level(logging.INFO, logger="fedge.agent"):
        first = readings(tmp_path, log)
        readings(tmp_path, log)
    assert (first.on_mains, first.battery_percent) == (False, None)
    assert log.counts["battery_garbled"] == 2
    assert sum("battery_garbled" in rec.getMessage() for rec in caplog.records) == 1
    assert decide(EligibilityConfig(), first, None, 0) == Decision(False, False, "battery_unknown")


def test_out_of_range_capacity_is_garbled(tmp_path: Path) -> None:
    supply(tmp_path, "BAT0", type="Battery", capacity="250")
    log = ReadingLog()
    assert readings(tmp_path, log).battery_percent is None
    assert log.counts["battery_garbled"] == 1


def test_garbled_online_flag_does_not_crash(tmp_path: Path) -> None:
    supply(tmp_path, "AC", type="Mains", online="\x00\xff")
    log = ReadingLog()
    assert readings(tmp_path, log).on_mains is None
    assert log.counts["power_garbled"] == 1


# -- temperature --------------------------------------------------------------------------


def test_cpu_zone_is_preferred_over_a_hotter_other_zone(tmp_path: Path) -> None:
    zone(tmp_path, 0, "acpitz", "90000")
    zone(tmp_path, 1, "x86_pkg_temp", "61000")
    zone(tmp_path, 2, "iwlwifi_1", "95000")
    assert readings(tmp_path).cpu_temp_c == pytest.approx(61.0)


def test_hottest_cpu_like_zone_wins(tmp_path: Path) -> None:
    zone(tmp_path, 0, "cpu0-silver-usr", "52000")
    zone(tmp_path, 1, "soc_thermal", "57000")
    zone(tmp_path, 2, "battery", "30000")
    assert readings(tmp_path).cpu_temp_c == pytest.approx(57.0)


def test_without_cpu_zones_the_hottest_zone_is_used(tmp_path: Path) -> None:
    zone(tmp_path, 0, "acpitz", "44000")
    zone(tmp_path, 1, "pch_skylake", "51000")
    assert readings(tmp_path).cpu_temp_c == pytest.approx(51.0)


def test_garbled_and_absurd_zones_are_skipped_and_counted(tmp_path: Path) -> None:
    zone(tmp_path, 0, "cpu-thermal", "hot")
    zone(tmp_path, 1, "cpu-thermal", "-273000")  # a disabled sensor's error value
    zone(tmp_path, 2, "gpu-thermal", "50000")
    write(tmp_path, "sys/class/thermal/cooling_device0", {"type": "fan", "cur_state": "1"})
    log = ReadingLog()
    assert readings(tmp_path, log).cpu_temp_c == pytest.approx(50.0)
    assert log.counts["thermal_garbled"] == 2


def test_no_thermal_zones_reads_unknown_and_allows(tmp_path: Path) -> None:
    log = ReadingLog()
    r = readings(tmp_path, log)
    assert r.cpu_temp_c is None
    assert log.counts["thermal_missing"] == 1
    assert decide(EligibilityConfig(), r, None, 0).train


# -- load ---------------------------------------------------------------------------------


def test_load_is_per_cpu(tmp_path: Path) -> None:
    r = read_readings(tmp_path, loadavg=lambda: (6.0, 1.0, 1.0), cpu_count=lambda: 4)
    assert r.load_per_cpu == pytest.approx(1.5)


def test_unavailable_load_reads_unknown(tmp_path: Path) -> None:
    def no_loadavg() -> tuple[float, float, float]:
        raise OSError("getloadavg unavailable")

    log = ReadingLog()
    r = read_readings(tmp_path, loadavg=no_loadavg, cpu_count=lambda: 4, problems=log)
    assert r.load_per_cpu is None
    assert log.counts["load_missing"] == 1
    r = read_readings(tmp_path, loadavg=quiet_load, cpu_count=lambda: None, problems=log)
    assert r.load_per_cpu is None


def test_reading_this_machine_never_raises() -> None:
    read_readings(problems=ReadingLog())


# -- decisions ----------------------------------------------------------------------------

CFG = EligibilityConfig(daily_upload_bytes=1000)
FINE = Readings(on_mains=True, cpu_temp_c=50.0, load_per_cpu=0.5)


@pytest.mark.parametrize(
    ("r", "expected"),
    [
        (FINE, Decision(True, True, "ok")),
        (Readings(on_mains=False, battery_percent=29.9), Decision(False, False, "battery_low")),
        (Readings(on_mains=False, battery_percent=30.0), Decision(True, True, "ok")),
        (Readings(on_mains=False), Decision(False, False, "battery_unknown")),
        (Readings(on_mains=True, cpu_temp_c=75.0), Decision(False, False, "too_hot")),
        (Readings(on_mains=True, cpu_temp_c=74.9), Decision(True, True, "ok")),
        (Readings(on_mains=True, load_per_cpu=2.0), Decision(False, False, "busy")),
        (Readings(), Decision(True, True, "ok")),  # everything unknown: allowed
        # Power is checked first, then heat, then load.
        (
            Readings(on_mains=False, battery_percent=5, cpu_temp_c=90, load_per_cpu=9),
            Decision(False, False, "battery_low"),
        ),
        (Readings(cpu_temp_c=90, load_per_cpu=9), Decision(False, False, "too_hot")),
    ],
)
def test_each_reason(r: Readings, expected: Decision) -> None:
    assert decide(CFG, r, ByteBudget(clock=Clock()), 100) == expected


def test_exhausted_budget_trains_but_does_not_upload() -> None:
    budget = ByteBudget(clock=Clock())
    budget.record(950)
    assert decide(CFG, FINE, budget, 50) == Decision(True, True, "ok")
    assert decide(CFG, FINE, budget, 51) == Decision(True, False, "budget_exhausted")
    # A device that must not train does not get to train because its budget is spent.
    hot = Readings(on_mains=True, cpu_temp_c=80)
    assert decide(CFG, hot, budget, 51) == Decision(False, False, "too_hot")


def test_no_limit_means_any_upload_fits() -> None:
    budget = ByteBudget(clock=Clock())
    budget.record(10**12)
    assert decide(EligibilityConfig(), FINE, budget, 10**12).upload
    assert decide(CFG, FINE, None, 1000).upload  # no history yet
    assert not decide(CFG, FINE, None, 1001).upload


def test_reasons_fit_a_skip_notice() -> None:
    for reason in REASONS:
        assert len(reason) <= 24 and reason.isascii()


def test_config_rejects_unknown_fields_and_nonsense() -> None:
    with pytest.raises(ValidationError):
        EligibilityConfig(min_battery_pct=20)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        EligibilityConfig(min_battery_percent=120)
    with pytest.raises(ValidationError):
        EligibilityConfig(daily_upload_bytes=-1)


# -- the byte budget ----------------------------------------------------------------------


def test_budget_is_a_rolling_24h_window() -> None:
    clock = Clock()
    budget = ByteBudget(clock=clock)
    budget.record(600)
    clock.now += 12 * 3600
    budget.record(300)
    assert budget.used() == 900
    assert not budget.fits(200, limit=1000)
    clock.now += 12 * 3600  # the first 600 bytes are now exactly 24 h old
    assert budget.used() == 300
    assert budget.fits(700, limit=1000)
    clock.now += 12 * 3600
    assert budget.used() == 0


def test_budget_survives_a_round_trip_through_the_state_file(tmp_path: Path) -> None:
    clock = Clock()
    budget = ByteBudget(clock=clock)
    budget.record(400)
    clock.now += 3600
    budget.record(100)
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"last_round": 3, "budget": budget.to_dict()}))

    clock.now += 3600  # the agent restarts an hour later
    again = ByteBudget.from_dict(json.loads(path.read_text())["budget"], clock=clock)
    assert again.used() == 500
    clock.now += DAY_S - 2 * 3600 + 1  # the first record has aged out; the second not yet
    assert again.used() == 100
    assert again.to_dict()["sent"] == [[clock.now - DAY_S + 3600 - 1, 100]]


@pytest.mark.parametrize(
    "raw",
    [None, {}, {"window_s": 86400}, {"window_s": "x", "sent": []}, {"window_s": 1, "sent": [1]}],
)
def test_garbled_budget_state_is_rejected(raw: object) -> None:
    with pytest.raises(ValueError):
        ByteBudget.from_dict(raw, clock=Clock())


def test_a_record_from_the_future_expires_one_window_after_now() -> None:
    clock = Clock()
    state = {"window_s": DAY_S, "sent": [[clock.now + 10 * DAY_S, 700]]}  # clock stepped back
    budget = ByteBudget.from_dict(state, clock=clock)
    assert budget.used() == 700
    clock.now += DAY_S
    assert budget.used() == 0


def test_record_count_is_bounded_without_undercounting() -> None:
    clock = Clock()
    budget = ByteBudget(clock=clock, max_records=4)
    for _ in range(10):
        budget.record(10)
        clock.now += 60
    assert len(budget.to_dict()["sent"]) == 4
    assert budget.used() == 100

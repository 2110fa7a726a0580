"""Pumps from NASA's progpy wear out; their devices read them over pseudo-terminals and learn
to warn of failures federatedly over a real Mosquitto. A machine that never failed while its
device was learning is warned of its first failure in time by the federated model."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("progpy")
from fedge.fleet.maintenance_run import run_maintenance

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_a_machine_that_never_failed_is_warned_of_its_first_failure(  # type: ignore[no-untyped-def]
    tmp_path: Path, mosquitto, fleet_id: str
) -> None:
    summary = run_maintenance(
        machines=6,
        rounds=8,
        broker=mosquitto.url,
        out=tmp_path / "run",
        fleet=fleet_id[-40:],
        seed=0,
        future_h=10.0,
        picture=False,
    )
    assert summary["rounds_completed"] == 8
    assert summary["samples_streamed"] == sum(summary["history_readings"])  # all over serial
    # The seeded fleet has one machine whose device saw no failure: it had nothing to learn
    # a failure from, alone.
    assert summary["never_failed"] == [1]
    assert summary["failures_in_history"][1] == 0
    first = summary["first_failure_of_never_failed"]["federated"]
    horizon = summary["settings"]["horizon_readings"]
    # Useful: a warning, at least min_lead readings (10 min) before the failure and not more
    # than twice the horizon early (a warning that early is counted as a false alarm).
    assert first["caught_in_time"] == 1 and first["precision"] == 1.0
    assert 10 / 60 <= first["mean_lead_h"] <= 2 * horizon / 60
    # The devices' samples stayed on the devices: a store each, nothing on the aggregator's.
    stores = sorted(p.name for p in (tmp_path / "run" / "state").glob("samples-*.sqlite"))
    assert stores == [f"samples-pump{m:03d}.sqlite" for m in range(6)]

"""progpy's pumps as a fleet: each machine wears out in its own way, fails, and is replaced."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("progpy")
from fedge.firmware_bridge.binary_frames import BinaryDecoder, encode_frame
from fedge.fleet.pump_fleet import CHANNELS, MachineRun, draw_profiles, frames, simulate_fleet

pytestmark = [pytest.mark.unit, pytest.mark.slow]  # progpy: about 5 s of CPU


@pytest.fixture(scope="module")
def runs() -> list[MachineRun]:
    rng = np.random.default_rng(4)
    profiles = draw_profiles(3, rng)
    return simulate_fleet(profiles, 8 * 3600.0, rng=rng, start_ages=np.array([0, 0, 3 * 3600]))


def test_pumps_run_to_failure_and_are_replaced(runs: list[MachineRun]) -> None:
    hours, tripped = CHANNELS.index("hours"), CHANNELS.index("tripped")
    assert all(len(run.readings) == 8 * 60 for run in runs)
    assert all(run.failures for run in runs)  # seeded: every machine failed within 8 hours
    for run in runs:
        flagged = np.flatnonzero(run.readings[:, tripped] == 1.0)
        assert list(flagged) == run.failures
        assert set(run.modes) <= {
            "ImpellerWearFailure",
            "PumpOilOverheat",
            "RadialBearingOverheat",
            "ThrustBearingOverheat",
        }
        after = run.failures[0] + 1
        if after < len(run.readings):  # a new pump: its hour meter starts again
            assert run.readings[after, hours] < 0.05
            assert run.readings[after, hours] < run.readings[after - 1, hours]
    # The third machine's record starts with a pump already 3 hours old.
    assert runs[2].readings[0, hours] == pytest.approx(3.0, abs=0.05)
    # Machines differ: their own wear, load and noise.
    assert len({run.failures[0] for run in runs}) == 3


def test_a_pump_reaches_its_device_in_the_firmware_frames_trip_flag_and_all(
    runs: list[MachineRun],
) -> None:
    wire = b"".join(encode_frame(s) for s in frames(runs[2].readings, 60.0))
    decoder = BinaryDecoder()
    got = decoder.feed(wire)
    assert not decoder.faults
    values = np.array([s.values for s in got], np.float32)
    np.testing.assert_array_equal(values, runs[2].readings)
    assert [s.timestamp_ms for s in got[:2]] == [0, 60_000]
    assert list(np.flatnonzero(values[:, -1] == 1.0)) == runs[2].failures

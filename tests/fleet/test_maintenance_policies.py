"""Warnings, lead times and costs of maintenance policies (pure functions)."""

from __future__ import annotations

import numpy as np
import pytest
from fedge.fleet.maintenance_policies import Costs, Outcome, first_warning, scheduled, score

pytestmark = pytest.mark.unit


def test_a_warning_needs_confirm_windows_in_a_row() -> None:
    p = np.array([0.9, 0.1, 0.9, 0.9, 0.2, 0.9, 0.9, 0.9])
    assert first_warning(p, first_window_end=7, threshold=0.5, confirm=3) == 7 + 7
    assert first_warning(p, first_window_end=7, threshold=0.5, confirm=1) == 7
    assert first_warning(p, first_window_end=7, threshold=0.95, confirm=1) is None


def test_a_schedule_replaces_only_pumps_that_live_that_long() -> None:
    assert scheduled(100, 80) == 80
    assert scheduled(60, 80) is None


def test_score_counts_catches_false_alarms_and_costs() -> None:
    costs = Costs(planned=10.0, unplanned_factor=5.0, downtime_per_day=20.0, outage_days=0.5)
    lives = [
        Outcome(0, length=100, warned_at=95),  # 5 readings ahead: too late, it fails anyway
        Outcome(0, length=100, warned_at=80),  # in time, and the failure came within 30
        Outcome(1, length=100, warned_at=10),  # in time, but 90 early: a false alarm
        Outcome(2, length=100, warned_at=None),  # ran to failure
    ]
    s = score(lives, reading_h=1.0, min_lead=10, warn_window=30, costs=costs)
    assert (s.warnings, s.caught_in_time, s.planned, s.unplanned) == (3, 2, 2, 2)
    assert s.recall == pytest.approx(2 / 4)
    assert s.precision == pytest.approx(2 / 3)  # leads 5 and 20 are within 30; 90 is not
    assert s.mean_lead_h == pytest.approx((5 + 20 + 90) / 3)
    assert s.operating_h == 100 + 80 + 10 + 100
    assert s.cost == 2 * 10.0 + 2 * (5.0 * 10.0 + 20.0 * 0.5)
    assert s.cost_per_1000h == pytest.approx(1000 * s.cost / s.operating_h)

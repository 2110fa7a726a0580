"""Maintenance policies scored on machines' future lives: warnings, lead times, costs (pure).

A policy looks at one pump's life from new, reading by reading, and either raises a warning
(maintenance is planned: the pump is replaced then, before it fails) or does not (the pump
runs until it fails). Every life ends one of the two ways, so a policy is scored life by life:

- **caught in time**: a warning came at least ``min_lead`` readings before the failure, time
  to plan the replacement (a later warning is raised but the pump fails all the same);
- **recall**: lives caught in time / lives (every life would have ended in a failure);
- **precision**: warnings the failure followed within ``warn_window`` readings / warnings
  (an earlier warning is a false alarm: the pump had plenty of life left);
- **lead time**: readings between warning and failure, over the warned lives;
- **cost**: a planned replacement costs ``planned``; an unplanned failure costs
  ``unplanned_factor * planned`` plus ``downtime_per_day`` for each of ``outage_days``
  (waiting for parts). An early replacement wastes the life left, so policies are compared
  by cost per operating hour (renewal-reward), reported per 1,000 machine-hours.

A model's warning is the first reading at which ``confirm`` consecutive windows in a row
had P(failure within the horizon) of at least ``threshold``; the fixed schedule's is the
pump's age reaching ``interval`` readings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Costs:
    planned: float = 1000.0  # C: a planned replacement (parts and labour)
    unplanned_factor: float = 5.0  # k: an unplanned failure costs k * C (damage, call-out)
    downtime_per_day: float = 2000.0  # D: a day the machine stands still
    outage_days: float = 1.0  # an unplanned failure stops the machine this long


@dataclass(frozen=True)
class Life:
    """One pump from new to failure: its model inputs per reading, and how long it ran."""

    machine: int
    length: int  # readings until the failure (the failure is reading ``length``)
    first_window_end: int  # reading at which the first model window ends


@dataclass(frozen=True)
class Outcome:
    machine: int
    length: int
    warned_at: int | None  # reading of the warning, None: it ran to failure

    @property
    def lead(self) -> int | None:
        return None if self.warned_at is None else self.length - self.warned_at


def first_warning(
    probabilities: np.ndarray, first_window_end: int, threshold: float, confirm: int
) -> int | None:
    """The reading at which ``confirm`` consecutive windows reached ``threshold``."""
    above = np.asarray(probabilities) >= threshold
    run = 0
    for k, hit in enumerate(above):
        run = run + 1 if hit else 0
        if run >= confirm:
            return first_window_end + k
    return None


def scheduled(length: int, interval: int) -> int | None:
    """A fixed-interval schedule: replace at age ``interval`` if the pump lives that long."""
    return interval if interval < length else None


@dataclass(frozen=True)
class Score:
    lives: int
    warnings: int
    caught_in_time: int
    precision: float
    recall: float
    mean_lead_h: float
    operating_h: float
    planned: int
    unplanned: int
    cost: float
    cost_per_1000h: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def score(
    outcomes: Sequence[Outcome],
    *,
    reading_h: float,
    min_lead: int,
    warn_window: int,
    costs: Costs,
) -> Score:
    leads = [o.lead for o in outcomes if o.lead is not None and o.lead > 0]
    warned = len(leads)
    right = sum(1 for lead in leads if lead <= warn_window)
    # A warning later than min_lead leaves no time to act: the pump fails all the same.
    acted = [o for o in outcomes if o.lead is not None and o.lead >= min_lead]
    caught = len(acted)
    unplanned = len(outcomes) - caught
    hours = (sum(o.length for o in outcomes) - sum(o.lead or 0 for o in acted)) * reading_h
    cost = caught * costs.planned + unplanned * (
        costs.unplanned_factor * costs.planned + costs.downtime_per_day * costs.outage_days
    )
    return Score(
        lives=len(outcomes),
        warnings=warned,
        caught_in_time=caught,
        precision=right / warned if warned else 0.0,
        recall=caught / len(outcomes) if outcomes else 0.0,
        mean_lead_h=float(np.mean(leads)) * reading_h if leads else 0.0,
        operating_h=hours,
        planned=caught,
        unplanned=unplanned,
        cost=cost,
        cost_per_1000h=1000.0 * cost / hours if hours else float("nan"),
    )

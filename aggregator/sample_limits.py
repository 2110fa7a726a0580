"""Bounding the sample counts devices declare (pure; no I/O).

FedAvg weights each update by the number of samples its device says it trained on. Nothing
can check that number, so one device claiming 10^9 samples would own the average. Each
declared count is clipped to the smallest of the device's own cap, a fleet-wide cap, and a
multiple of the round's median declared count: the lower median, so that liars must be more
than half of the round to raise it (with two devices, the honest one's count is the median).

What this does not stop: a device that stays under its caps still chooses its weight within
them, and devices that together are more than half of the round can move the median.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Bounded:
    used: dict[str, int]  # device -> the count the average weighs it with
    clipped: dict[str, int]  # device -> what it declared, for the devices that were clipped


def bound_samples(
    declared: Mapping[str, int],
    *,
    caps: Mapping[str, int] | None = None,
    max_per_device: int = 0,
    median_factor: float = 0.0,
) -> Bounded:
    """Clip each device's declared count; 0 turns ``max_per_device`` or ``median_factor`` off."""
    limit_all = max_per_device or None
    if median_factor and declared:
        by_median = max(1, int(median_factor * statistics.median_low(declared.values())))
        limit_all = by_median if limit_all is None else min(limit_all, by_median)
    used: dict[str, int] = {}
    clipped: dict[str, int] = {}
    for device, count in declared.items():
        limits = [x for x in ((caps or {}).get(device), limit_all) if x is not None]
        bound = min([count, *limits])
        used[device] = bound
        if bound < count:
            clipped[device] = count
    return Bounded(used, clipped)

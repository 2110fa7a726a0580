"""Federated evaluation: the devices' scores of a round's global model, combined (pure).

Each selected device scores the model the round announced on examples it held out of its
own training (``fedge.agent.evaluation``) and sends the score with its answer. The round's
federated score is the mean over devices weighted by how many examples each scored; a
device's count is clipped to its weight in the average (``sample_limits``), so a device
that claims a huge evaluation cannot own the score any more than it can own the model.

The score is of the model the round started from (the previous round's result), not of the
model the round produces: compare it with the held-out score of that earlier model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from fedge.protocol import Evaluation


def combine(
    reports: Mapping[str, Evaluation], weights: Mapping[str, int], model_version: int
) -> dict[str, Any] | None:
    """``{model_version, devices, count, loss, accuracy | mae}`` over the devices that
    reported, or None when none did (or all carry no weight)."""
    counts = {d: min(e.count, weights.get(d, 0)) for d, e in reports.items()}
    used = {d: n for d, n in counts.items() if n > 0}
    if not used:
        return None
    out: dict[str, Any] = {
        "model_version": model_version,
        "devices": len(used),
        "count": int(sum(used.values())),
        "loss": _mean({d: reports[d].loss for d in used}, used),
    }
    for key in ("accuracy", "mae"):  # one of them, unless a fleet mixes model kinds
        values = {d: getattr(reports[d], key) for d in used}
        present = {d: v for d, v in values.items() if v is not None}
        if present:
            out[key] = _mean(present, used)
    return out


def _mean(values: Mapping[str, float], counts: Mapping[str, int]) -> float:
    devices = sorted(values)
    return float(np.average([values[d] for d in devices], weights=[counts[d] for d in devices]))

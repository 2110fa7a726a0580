"""Federated evaluation on the device (pure steps; no I/O).

In the field there is no central test set: each selected device scores the global model it
received on the most recent examples of its round data, which it then leaves out of that
round's training, and reports the score with its answer::

    hold_out -> score (global weights, before training) -> train on the rest

Examples are oldest first (the sensor store's order; a data file's row order), so the held-out
slice is the newest: what the model will meet next. Under a sliding-window task the first
held-out window shares readings with the last trained one.
"""

from __future__ import annotations

import math

import numpy as np
from fedge.models.runtime import Runtime
from fedge.protocol import Evaluation

from .dataset import Dataset


def hold_out(data: Dataset, fraction: float, minimum: int) -> tuple[Dataset, Dataset | None]:
    """(what trains, what is held out): the newest ``fraction`` of ``data``, at least
    ``minimum`` examples; nothing is held out when ``fraction`` is 0 or when that would leave
    fewer examples to train on than it holds out."""
    n = len(data)
    if fraction <= 0:
        return data, None
    held = max(math.ceil(fraction * n), minimum)
    if held > n - held:
        return data, None
    keep = n - held
    return Dataset(data.x[:keep], data.y[:keep]), Dataset(data.x[keep:], data.y[keep:])


def score(runtime: Runtime, held: Dataset) -> Evaluation | None:
    """The runtime's current weights on ``held``: accuracy for integer labels, else the mean
    absolute error. None when the model's output is not finite (a diverged global model)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        loss, metric = runtime.evaluate(held.x, held.y)
    if not (math.isfinite(loss) and math.isfinite(metric)):
        return None
    key = "accuracy" if np.issubdtype(held.y.dtype, np.integer) else "mae"
    # float32 arithmetic can land a hair outside [0, 1]; the wire bounds it exactly.
    value = min(max(metric, 0.0), 1.0) if key == "accuracy" else max(metric, 0.0)
    return Evaluation.model_validate({"count": len(held), "loss": max(loss, 0.0), key: value})

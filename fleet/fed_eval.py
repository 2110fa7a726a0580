"""How closely federated evaluation tracks the central held-out score (pure; no I/O).

A round's ``fed_eval`` (``rounds.jsonl``) is the devices' score of the model the round was
announced with: the model the previous round made. The round's own ``accuracy`` (or ``mae``)
is the aggregator's held-out score of the model the round makes. Like is compared with like
by model version: each federated score is paired with the central score of the model it
scored, and placed at the round that made that model (0: the initial model, which no round
scored centrally).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Point:
    made_by: int  # the round that made the scored model (0: the initial model)
    version: int | None
    federated: float  # the devices' score, sample-weighted
    central: float | None  # the aggregator's held-out score of the same model, if any
    count: int  # examples the devices scored


def aligned(rounds: Iterable[Mapping[str, Any]], key: str = "accuracy") -> list[Point]:
    """One point per round whose lines carry a federated ``key`` (rounds.jsonl objects)."""
    rounds = list(rounds)
    made: dict[int, tuple[int, float | None]] = {}  # version -> (round that made it, score)
    for r in rounds:
        version = r.get("model_version")
        if r.get("status") == "done" and isinstance(version, int) and version not in made:
            made[version] = (int(r["round"]), _number(r.get(key)))
    points = []
    for r in rounds:
        fed = r.get("fed_eval")
        value = _number(fed.get(key)) if isinstance(fed, Mapping) else None
        if value is None:
            continue
        assert isinstance(fed, Mapping)
        version = fed.get("model_version")
        by, central = made.get(version, (int(r["round"]) - 1, None))  # type: ignore[arg-type]
        points.append(Point(by, version, value, central, int(fed.get("count") or 0)))
    return points


def median_gap(points: Sequence[Point]) -> float | None:
    """The median of |federated - central| over the points that have both."""
    gaps = [abs(p.federated - p.central) for p in points if p.central is not None]
    return statistics.median(gaps) if gaps else None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)

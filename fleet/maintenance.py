"""The predictive-maintenance fleet: what federating is worth, in warnings and in money.

``fedge sim --scenario maintenance``. A fleet of centrifugal pumps from NASA's progpy
(:mod:`fedge.fleet.pump_fleet`), each with its own wear, load and sensor noise, started at
different ages, run to failure and replaced, is precomputed once per run. Every machine's
history is then played to its own agent over a pseudo-terminal in the firmware's binary frame
format; the agent (the one a Raspberry Pi runs) stores the readings in SQLite and, when a
round starts, turns them into the ``failure`` task's examples (labels from its own past
failures; devices that never saw one offer negatives) and trains the ``pump_failure`` model;
the aggregator federates them over MQTT.

Then the machines' futures are scored (:mod:`fedge.fleet.maintenance_policies`): the pump
each machine runs when the history ends, until its failure, and the next pumps, each from new
to failure. Four policies: the federated model; each device's own model (trained on its own
examples alone, as many epochs as it trained in the rounds); a centralised model (every
device's examples pooled: the usual upper bound, though at one fixed warning threshold it is
not always ahead on recall); and a fixed-interval schedule (replace at an age
that the fleet's observed lives were longer than, ``schedule_quantile`` of them).
The future lives are scored offline on the same readings the devices would see; they do not
pass the serial path again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fedge.agent.dataset import Dataset
from fedge.agent.tasks import failure_features
from fedge.agent.trainer import train_local
from fedge.models.runtime import load_runtime

from .maintenance_policies import Outcome, first_warning, scheduled
from .pump_fleet import CENTER, SCALE, MachineRun, draw_profiles, simulate_fleet

WINDOW = 8  # readings per model window (the spec's input: WINDOW x 6, five sensors + hours)
READING_S = 60.0


def failure_model() -> Path:
    return Path(str(resources.files("fedge.models") / "artifacts" / "pump_failure.tflite"))


def scale(values: np.ndarray) -> np.ndarray:
    center, spread = np.asarray(CENTER, np.float32), np.asarray(SCALE, np.float32)
    return ((np.asarray(values, np.float32) - center) / spread).astype(np.float32)


@dataclass
class FutureLife:
    """A pump whose failure lies after the history: scored from ``start`` on."""

    machine: int
    begin: int  # where the pump's readings start in the machine's record
    readings: np.ndarray  # from the pump's first recorded reading up to (not incl.) its failure
    start: int  # first reading a policy may act on (0 for a new pump)
    age0: float  # the pump's age (readings) at readings[0]
    first_failure: bool  # the machine never failed during its history


@dataclass
class FleetPlan:
    runs: list[MachineRun]
    history: list[int]  # readings each machine's device receives
    futures: list[FutureLife] = field(default_factory=list)
    history_lives: list[float] = field(default_factory=list)  # ages (readings) at failure
    monitor: np.ndarray | None = None  # a machine outside the fleet: the aggregator's eval set

    def history_readings(self, m: int) -> np.ndarray:
        return self.runs[m].readings[: self.history[m]]

    def never_failed(self) -> list[int]:
        return [m for m, run in enumerate(self.runs) if not _before(run.failures, self.history[m])]


def _before(failures: list[int], end: int) -> list[int]:
    return [f for f in failures if f < end]


def plan_fleet(
    machines: int,
    *,
    seed: int,
    history_h: tuple[float, float] = (1.0, 8.0),
    future_h: float = 30.0,
    start_age_h: tuple[float, float] = (0.0, 8.0),
    monitor: bool = False,
) -> FleetPlan:
    """Precompute the fleet: each machine's history (the devices' data) and its futures.

    History lengths are drawn from ``history_h`` hours (devices joined at different times;
    some have not seen their machine fail yet), start ages from ``start_age_h``. With
    ``monitor``, one more machine is simulated whose whole record is kept apart
    (:attr:`FleetPlan.monitor`) for the aggregator's round-by-round evaluation.
    """
    rng = np.random.default_rng(seed)
    total = machines + int(monitor)
    profiles = draw_profiles(total, rng)
    starts = rng.uniform(*start_age_h, total) * 3600.0
    history = [int(h * 3600 / READING_S) for h in rng.uniform(*history_h, total)]
    runs = simulate_fleet(
        profiles,
        (max(history_h) + future_h) * 3600.0,
        rng=rng,
        reading_s=READING_S,
        start_ages=starts,
    )
    plan = FleetPlan(runs[:machines], history[:machines])
    if monitor:
        plan.monitor = runs[-1].readings
    for m, run in enumerate(plan.runs):
        h = history[m]
        past = _before(run.failures, h)
        plan.history_lives += [float(run.ages[f]) / READING_S for f in past]
        begin = past[-1] + 1 if past else 0
        for f in [f for f in run.failures if f >= h]:
            start = max(h - begin, 0)
            plan.futures.append(
                FutureLife(
                    machine=m,
                    begin=begin,
                    readings=run.readings[begin:f],
                    start=start,
                    age0=float(run.ages[begin]) / READING_S - 1.0,
                    first_failure=not past and begin == 0,
                )
            )
            begin = f + 1
    return plan


# -- the policies -------------------------------------------------------------------
Warner = Callable[[FutureLife], "int | None"]


def model_warner(runtime: Any, *, threshold: float, confirm: int) -> Warner:
    def warn(life: FutureLife) -> int | None:
        first = max(life.start, WINDOW - 1)
        if len(life.readings) <= first:
            return None
        x = failure_features(scale(life.readings), WINDOW)[first - (WINDOW - 1) :]
        probs = _softmax(runtime.infer(x))[:, 1]
        return first_warning(probs, first, threshold, confirm)

    return warn


def schedule_warner(interval: float) -> Warner:
    def warn(life: FutureLife) -> int | None:
        # Replace when the pump's age reaches the interval (at once if it already has).
        at = max(int(np.ceil(interval - life.age0)), life.start)
        return scheduled(len(life.readings), at)

    return warn


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def outcomes(futures: list[FutureLife], warn: Warner) -> list[Outcome]:
    out = []
    for life in futures:
        at = warn(life)
        # Hours are counted from when the policy takes over (``start``).
        out.append(
            Outcome(
                life.machine,
                len(life.readings) - life.start,
                None if at is None else at - life.start,
            )
        )
    return out


# -- training the comparison models ------------------------------------------------------
def train_model(
    model: Path,
    data: list[Dataset],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> Any:
    runtime = load_runtime(model, prefer=("numpy",))
    pooled = Dataset(np.concatenate([d.x for d in data]), np.concatenate([d.y for d in data]))
    train_local(
        runtime,
        pooled,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        rng=np.random.default_rng(seed),
    )
    return runtime

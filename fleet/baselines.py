"""What the federated model is compared with, round by round, in a field test.

- **centralised**: the same model trained on the union of every device's data, for as
  many passes per round as a device makes (E), with the same batch size and learning rate;
- **non-participant**: one device that trains exactly as often on its own partition (a
  copy of the first device's) but never talks to the aggregator;
- **device-local**: each device's own model right after its local training in a round,
  before averaging (collected through :attr:`fedge.agent.daemon.Agent.on_trained`).

All are scored on the same held-out test set as the federated model.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from fedge.agent.dataset import Dataset
from fedge.agent.trainer import train_local
from fedge.aggregator.service import HeldOutEvaluator
from fedge.models.runtime import load_runtime

Score = dict[str, float]


class Scorer(HeldOutEvaluator):
    """The aggregator's held-out evaluation, as a dict for ``baselines.jsonl``."""

    def score(self, weights: Mapping[str, np.ndarray]) -> Score:
        loss, metric = self(dict(weights))
        return {self.metric_name: metric, "loss": loss}


class SoloTrainer:
    """A model that trains on one data set, E epochs per round, and never federates."""

    def __init__(
        self, model: Path, data: Dataset, *, epochs: int, batch_size: int, lr: float, seed: int
    ) -> None:
        self.runtime = load_runtime(model)
        self.data = data
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.rng = np.random.default_rng(seed)

    def round(self, scorer: Scorer) -> Score:
        train_local(
            self.runtime,
            self.data,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            rng=self.rng,
        )
        return scorer.score(self.runtime.get_weights())


class LocalModels:
    """Collects device-local weights per round from agent threads (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_round: dict[int, dict[str, dict[str, np.ndarray]]] = {}

    def hook(self, device_id: str):  # type: ignore[no-untyped-def]
        def on_trained(round_id: int, weights: dict[str, np.ndarray]) -> None:
            with self._lock:
                self._by_round.setdefault(round_id, {})[device_id] = weights

        return on_trained

    def pop(self, round_id: int) -> dict[str, dict[str, np.ndarray]]:
        with self._lock:
            return self._by_round.pop(round_id, {})

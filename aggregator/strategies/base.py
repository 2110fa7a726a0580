"""What every server strategy and every combiner offers (no strategy lives here).

A round's accepted deltas go through two steps, each pure numpy:

1. a :class:`Combiner` turns the deltas and their sample counts into ONE delta (the
   sample-weighted mean, or a robust replacement: see ``robust.py``); the plain mean is also
   kept as a running sum while updates arrive (``aggregator/accumulate.py``), so the list of
   deltas is only needed by the robust combiners;
2. a :class:`Strategy` (a server optimiser: FedAvg, FedAvgM, FedAdam) applies that delta to
   the global model, with whatever state it carries between rounds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

Weights = Mapping[str, np.ndarray]


class Combiner(Protocol):
    """How a round's deltas become the one delta a server optimiser applies."""

    def __call__(self, deltas: Sequence[Weights], counts: Sequence[int]) -> dict[str, np.ndarray]:
        """One float64 delta from the round's deltas and their devices' sample counts."""
        ...

    def describe(self) -> str:
        """Short text for logs; ``"mean"`` for the plain sample-weighted mean."""
        ...


class Strategy(ABC):
    """A server optimiser; ``combiner`` says how it combines a round's deltas first."""

    name: str
    combiner: Combiner

    def step(
        self, weights: Weights, deltas: Sequence[Weights], counts: Sequence[int]
    ) -> dict[str, np.ndarray]:
        """The next global model (float32) from this round's accepted deltas."""
        return self.apply(weights, self.combiner(deltas, counts))

    @abstractmethod
    def apply(self, weights: Weights, combined: Weights) -> dict[str, np.ndarray]:
        """The next global model (float32) from the round's combined delta (float64): what
        the combiner made of the deltas, or the aggregator's running sample-weighted mean."""

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to persist with the model this strategy just produced."""
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:  # noqa: B027 - optional hook
        """Restore what :meth:`state` returned (after an aggregator restart)."""

    def describe(self) -> str:
        """The optimiser and its settings, then the combiner unless it is the plain mean."""
        how = self.combiner.describe()
        return self.optimiser() if how == "mean" else f"{self.optimiser()} [{how}]"

    def optimiser(self) -> str:
        """The server optimiser and its settings, for logs."""
        return self.name

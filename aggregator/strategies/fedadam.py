"""FedAdam: Adam on the server with the combined delta as pseudo-gradient (Reddi et al. 2021).

Algorithm 2 of "Adaptive Federated Optimization", with ``Delta_t`` the round's deltas
combined: the sample-weighted mean of the paper unless configured otherwise (a robust
combiner, ``robust.py``)::

    m <- beta1 * m + (1 - beta1) * Delta
    v <- beta2 * v + (1 - beta2) * Delta^2
    w <- w + server_lr * m / (sqrt(v) + tau)

As in the paper there is no bias correction; ``tau`` sets how adaptive the step is.

Lazy, as LazyAdam is for sparse gradients: the moments and the weights change only where
the combined delta is non-zero. Under top-k uploads most coordinates are absent in a round; an
eager update would let their second moment decay and then give a coordinate that reappears a
full ``server_lr`` step however small its change (it cost 3 points on IID digits). Where every
coordinate is sent, lazy and eager are the same.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .base import Combiner, Strategy, Weights
from .robust import MEAN

# Server step of FedAdam unless configured: tuned on digits over 0.003-0.1 (bench/README.md).
FEDADAM_SERVER_LR = 0.05


def fedadam_step(
    weights: Weights,
    combined: Mapping[str, np.ndarray],
    m: Mapping[str, np.ndarray] | None,
    v: Mapping[str, np.ndarray] | None,
    *,
    server_lr: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(next weights as float32, next first moment, next second moment)."""
    new_m: dict[str, np.ndarray] = {}
    new_v: dict[str, np.ndarray] = {}
    new_w: dict[str, np.ndarray] = {}
    for k, w in weights.items():
        d = np.asarray(combined[k], np.float64)
        seen = d != 0  # lazy: only coordinates some device sent move (see the module doc)
        prev_m = m[k] if m is not None else np.zeros_like(d)
        prev_v = v[k] if v is not None else np.zeros_like(d)
        new_m[k] = np.where(seen, beta1 * prev_m + (1 - beta1) * d, prev_m)
        new_v[k] = np.where(seen, beta2 * prev_v + (1 - beta2) * d * d, prev_v)
        step = np.where(seen, server_lr * new_m[k] / (np.sqrt(new_v[k]) + tau), 0.0)
        new_w[k] = (np.asarray(w, np.float64) + step).astype(np.float32)
    return new_w, new_m, new_v


class FedAdam(Strategy):
    name = "fedadam"

    def __init__(
        self,
        server_lr: float = FEDADAM_SERVER_LR,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        combiner: Combiner = MEAN,
    ) -> None:
        self.server_lr = server_lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self.combiner = combiner
        self.m: dict[str, np.ndarray] | None = None
        self.v: dict[str, np.ndarray] | None = None

    def apply(self, weights: Weights, combined: Weights) -> dict[str, np.ndarray]:
        new_w, self.m, self.v = fedadam_step(
            weights,
            combined,
            self.m,
            self.v,
            server_lr=self.server_lr,
            beta1=self.beta1,
            beta2=self.beta2,
            tau=self.tau,
        )
        return new_w

    def state(self) -> dict[str, np.ndarray]:
        out = {f"m/{k}": a for k, a in (self.m or {}).items()}
        out.update({f"v/{k}": a for k, a in (self.v or {}).items()})
        return out

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        m = {k[2:]: np.asarray(a, np.float64) for k, a in state.items() if k.startswith("m/")}
        v = {k[2:]: np.asarray(a, np.float64) for k, a in state.items() if k.startswith("v/")}
        self.m, self.v = (m, v) if m and v else (None, None)

    def optimiser(self) -> str:
        return (
            f"fedadam(server_lr={self.server_lr:g}, beta1={self.beta1:g}, "
            f"beta2={self.beta2:g}, tau={self.tau:g})"
        )

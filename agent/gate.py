"""Whether an update is worth its bytes: the upload gate (pure functions).

After local training the device compares this round's delta with the model it received
(not the residual it carries: under top-k that holds most of the model's change by design):

- **relative size**: ``||delta|| / (lr * ||w_global||)`` below ``threshold`` means the
  update would barely move the model. Relative to the model, so one threshold serves
  models of any scale, and per unit of learning rate, so one threshold serves learning
  rates from 0.01 to 0.1: a smaller step makes every delta proportionally smaller, which
  says nothing about whether it matters (measured in bench/README.md).
- **relevance** (optional, CMFL, Wang et al., ICDCS 2019): the share of coordinates whose
  sign agrees with the last global update; below ``min_agreement`` the update pulls
  against where the federation is going.
- **staleness bound**: after ``max_skips`` skipped rounds in a row the device uploads
  whatever it has, so no device falls silent for long (a gate with no bound cost 2-3
  points of accuracy in simulation).

A skipped update is not lost: it stays in the residual and is sent with a later one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from fedge.protocol import GateSettings

Weights = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class GateDecision:
    upload: bool
    reason: str  # "ok", "stale" (forced by the bound), "small_update", "irrelevant", "privacy"
    relative_norm: float
    agreement: float | None


def _norm(weights: Weights) -> float:
    return float(
        np.sqrt(sum(float(np.sum(np.square(w, dtype=np.float64))) for w in weights.values()))
    )


def relative_norm(update: Weights, global_weights: Weights) -> float:
    """``||update|| / ||w_global||`` over all tensors; infinite when the model is all zeros."""
    base = _norm(global_weights)
    size = _norm(update)
    if base == 0.0:
        return float("inf") if size > 0 else 0.0
    return size / base


def sign_agreement(update: Weights, last_global_update: Weights) -> float:
    """Share of coordinates where the update and the last global update have the same sign.

    Coordinates where either is exactly zero are left out; 1.0 when none remain.
    """
    same = total = 0
    for name, u in update.items():
        g = last_global_update.get(name)
        if g is None:
            continue
        su, sg = np.sign(u), np.sign(g)
        mask = (su != 0) & (sg != 0)
        total += int(mask.sum())
        same += int((su[mask] == sg[mask]).sum())
    return 1.0 if total == 0 else same / total


def decide(
    cfg: GateSettings,
    update: Weights,
    global_weights: Weights,
    *,
    consecutive_skips: int,
    last_global_update: Weights | None = None,
    lr: float = 1.0,
) -> GateDecision:
    """``relative_norm`` in the decision is per unit of ``lr`` (the round's learning rate)."""
    rel = relative_norm(update, global_weights) / lr
    agreement = None
    if cfg.min_agreement is not None and last_global_update is not None:
        agreement = sign_agreement(update, last_global_update)
    if consecutive_skips >= cfg.max_skips:
        small = rel < cfg.threshold or (
            agreement is not None and agreement < (cfg.min_agreement or 0)
        )
        return GateDecision(True, "stale" if small else "ok", rel, agreement)
    if rel < cfg.threshold:
        return GateDecision(False, "small_update", rel, agreement)
    if agreement is not None and cfg.min_agreement is not None and agreement < cfg.min_agreement:
        return GateDecision(False, "irrelevant", rel, agreement)
    return GateDecision(True, "ok", rel, agreement)

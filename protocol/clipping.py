"""The L2 clip of differential privacy (docs/privacy.md), pure numpy.

Both ends use it: a device clips its update before it adds local noise or encodes it, and an
aggregator under central DP clips every decoded update again to the round's bound, so the
sensitivity of the sum it adds noise to holds whatever a device sent (int8 rounding can
lengthen a clipped update a little; a device of another build may not clip at all).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Weights = Mapping[str, np.ndarray]

# A clipped update is scaled a hair below the bound, so that its float32 norm is at most the
# bound whatever the rounding (the norm of the rounded tensors can exceed C by an ulp).
_MARGIN = 1.0 - 1e-6


def l2_norm(update: Weights) -> float:
    """The L2 norm of all tensors together, accumulated in float64."""
    return float(
        np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values()))
    )


def clip_l2(update: Weights, bound: float) -> tuple[dict[str, np.ndarray], float]:
    """``update`` scaled to an L2 norm of at most ``bound`` (float32), and its norm before.

    An update within the bound is returned as it is (as float32); a longer one is scaled
    down as a whole, so its direction is kept.
    """
    if not bound > 0:
        raise ValueError(f"the clip bound must be positive, not {bound}")
    norm = l2_norm(update)
    if norm <= bound:
        return {k: np.asarray(v, np.float32) for k, v in update.items()}, norm
    scale = bound / norm * _MARGIN
    return {
        k: (np.asarray(v, np.float64) * scale).astype(np.float32) for k, v in update.items()
    }, norm

"""The upload gate's pure parts."""

from __future__ import annotations

import numpy as np
import pytest
from fedge.agent.gate import decide, relative_norm, sign_agreement
from fedge.protocol import GateSettings

pytestmark = pytest.mark.unit


def w(*values: float) -> dict[str, np.ndarray]:
    return {"a": np.array(values, np.float32)}


def test_relative_norm_is_scale_free() -> None:
    g = w(3.0, 4.0)  # ||g|| = 5
    assert relative_norm(w(0.3, 0.4), g) == pytest.approx(0.1)
    assert relative_norm(w(30.0, 40.0), {"a": g["a"] * 100}) == pytest.approx(0.1)
    assert relative_norm(w(0.0, 0.0), w(0.0, 0.0)) == 0.0
    assert relative_norm(w(1.0, 0.0), w(0.0, 0.0)) == float("inf")


def test_sign_agreement_ignores_zeros() -> None:
    assert sign_agreement(w(1, -1, 1, 0), w(1, 1, 1, 5)) == pytest.approx(2 / 3)
    assert sign_agreement(w(0, 0), w(1, 1)) == 1.0


def test_decisions() -> None:
    g = w(3.0, 4.0)
    cfg = GateSettings(threshold=0.05, min_agreement=0.6, max_skips=2)
    assert decide(cfg, w(0.1, 0.1), g, consecutive_skips=0).reason == "small_update"
    assert decide(cfg, w(1.0, 1.0), g, consecutive_skips=0).upload
    irrelevant = decide(cfg, w(1.0, -1.0), g, consecutive_skips=0, last_global_update=w(-1, 1))
    assert not irrelevant.upload and irrelevant.reason == "irrelevant"
    forced = decide(cfg, w(0.1, 0.1), g, consecutive_skips=2)
    assert forced.upload and forced.reason == "stale"
    assert decide(GateSettings(threshold=0), w(0, 0), g, consecutive_skips=0).upload  # gate off


def test_threshold_is_per_unit_of_learning_rate() -> None:
    """Ten times the learning rate makes a ten times larger delta: the same decision."""
    g = w(3.0, 4.0)
    cfg = GateSettings(threshold=0.5, max_skips=5)
    small_lr = decide(cfg, w(0.012, 0.016), g, consecutive_skips=0, lr=0.01)
    large_lr = decide(cfg, w(0.12, 0.16), g, consecutive_skips=0, lr=0.1)
    assert small_lr.relative_norm == pytest.approx(large_lr.relative_norm) == pytest.approx(0.4)
    assert small_lr.upload == large_lr.upload is False

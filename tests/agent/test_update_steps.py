"""The update path's pure steps, each alone."""

from __future__ import annotations

import numpy as np
import pytest
from fedge.agent import update as steps
from fedge.protocol import GateSettings, TrainingConfig, parse_codec

pytestmark = pytest.mark.unit
G = {"w": np.full((20, 30), 1.0, np.float32), "b": np.ones(30, np.float32)}


def delta(scale: float, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in G.items()}


def test_local_delta_and_divergence() -> None:
    local = {k: v + 0.5 for k, v in G.items()}
    d = steps.local_delta(local, G)
    assert all(np.allclose(v, 0.5) and v.dtype == np.float32 for v in d.values())
    steps.check_trained(1.0, d)
    with pytest.raises(steps.Diverged, match="training diverged"):
        steps.check_trained(float("nan"), d)
    d["b"][3] = np.inf
    with pytest.raises(steps.Diverged):
        steps.check_trained(1.0, d)


def test_what_is_sent_plus_what_remains_is_the_update() -> None:
    cfg = TrainingConfig(codec="topk:0.05+int8", topk_min_entries=0)
    update = steps.with_residual(delta(0.1), delta(0.01, seed=1))
    encoding = steps.encode(update, cfg, np.random.default_rng(0))
    kept = steps.remaining(update, encoding)
    assert kept is not None
    for k in update:
        np.testing.assert_allclose(encoding.encoded.decoded[k] + kept[k], update[k], atol=1e-6)
    lossless = steps.encode(update, TrainingConfig(codec="float32"), np.random.default_rng(0))
    assert steps.remaining(update, lossless) is None


def test_top_k_keeps_at_least_the_minimum_entries() -> None:
    update = delta(0.1)
    size = sum(v.size for v in update.values())  # 630
    spec = parse_codec("topk:0.02").with_min_entries(size, 100)
    assert spec.topk_count(size) >= 100 and spec.fraction == pytest.approx(0.1588)
    assert parse_codec("int8").with_min_entries(size, 100) == parse_codec("int8")


def test_a_late_update_is_held_back_whole() -> None:
    cfg = TrainingConfig(lr=0.1, gate=GateSettings(threshold=0))
    on_time = steps.gate(
        cfg, delta(0.1), G, consecutive_skips=0, last_global_update=None, late=False
    )
    late = steps.gate(cfg, delta(0.1), G, consecutive_skips=0, last_global_update=None, late=True)
    assert on_time.upload and not late.upload and late.reason == "other"

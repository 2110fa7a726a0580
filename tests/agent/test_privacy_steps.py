"""The device's differential privacy steps (agent/update.py): clip, local noise, the gate
forced open, and the residual kept only of the clipped update."""

from __future__ import annotations

import numpy as np
import pytest
from fedge.agent import update as steps
from fedge.protocol import GateSettings, PrivacySettings, TrainingConfig, l2_norm
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.unit
G = {"w": np.full((20, 30), 1.0, np.float32), "b": np.ones(30, np.float32)}


def delta(scale: float, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in G.items()}


@settings(max_examples=60, deadline=None)
@given(
    scale=st.floats(1e-6, 1e4),
    bound=st.floats(1e-4, 1e3),
    seed=st.integers(0, 1000),
)
def test_the_clipped_norm_never_exceeds_the_bound(scale: float, bound: float, seed: int) -> None:
    update = delta(scale, seed)
    clipped = steps.clip(update, PrivacySettings(clip=bound))
    after = l2_norm(clipped.update)
    assert after <= bound  # exactly: the float32 result, measured in float64
    assert clipped.within == (clipped.norm <= bound)
    if clipped.within:  # within the bound: untouched
        assert all(np.array_equal(clipped.update[k], update[k]) for k in update)
    else:  # longer: scaled to the bound, direction kept
        assert after == pytest.approx(bound, rel=1e-5)
        ratio = clipped.update["w"] / update["w"]
        assert np.allclose(ratio, ratio.flat[0], rtol=1e-4)


def test_local_noise_has_the_calibrated_spread() -> None:
    privacy = PrivacySettings(clip=0.5, noise_multiplier=1.3)
    zero = {"w": np.zeros((200, 250), np.float32)}
    noised = steps.local_noise(zero, privacy, np.random.default_rng(7))
    # 50,000 draws: the sample std is within 1% of z * C = 0.65 (its own s.e. is 0.3%)
    assert np.std(noised["w"]) == pytest.approx(0.65, rel=0.01)
    assert abs(float(np.mean(noised["w"]))) < 0.01
    central = PrivacySettings(clip=0.5)  # noise multiplier 0: the aggregator adds it
    assert np.array_equal(
        steps.local_noise(zero, central, np.random.default_rng(7))["w"], zero["w"]
    )


def test_with_privacy_the_gate_never_holds_an_update_back() -> None:
    # A tiny delta the plain gate would skip as "small_update".
    gate = GateSettings(threshold=0.5, max_skips=5)
    plain = TrainingConfig(lr=0.1, gate=gate)
    private = TrainingConfig(lr=0.1, gate=gate, privacy=PrivacySettings(clip=1.0))
    tiny = delta(1e-6)
    skipped = steps.gate(plain, tiny, G, consecutive_skips=0, last_global_update=None, late=False)
    sent = steps.gate(private, tiny, G, consecutive_skips=0, last_global_update=None, late=False)
    late = steps.gate(private, tiny, G, consecutive_skips=0, last_global_update=None, late=True)
    assert not skipped.upload and skipped.reason == "small_update"
    assert sent.upload and sent.reason == "privacy"
    assert not late.upload  # a late update would not count anyway


def test_the_residual_holds_only_what_the_codec_kept_of_the_clipped_update() -> None:
    privacy = PrivacySettings(clip=0.2)
    cfg = TrainingConfig(codec="topk:0.05+int8", topk_min_entries=0, privacy=privacy)
    big = delta(1.0)  # norm about 25: most of it is cut off by the clip
    clipped = steps.clip(steps.with_residual(big, None), privacy)
    encoding = steps.encode(clipped.update, cfg, np.random.default_rng(0))
    kept = steps.remaining(clipped.update, encoding)
    assert kept is not None
    # sent + kept is the clipped update, not the delta: the cut-off part is gone
    assert l2_norm(kept) <= privacy.clip
    total = {k: encoding.encoded.decoded[k] + kept[k] for k in kept}
    assert l2_norm(total) == pytest.approx(l2_norm(clipped.update), rel=1e-4)
    # next round, residual + delta is clipped again: no upload exceeds the bound
    again = steps.clip(steps.with_residual(delta(1.0, seed=1), kept), privacy)
    assert l2_norm(again.update) <= privacy.clip

"""Compact globals (``fedge.protocol.downlink``): over 50 versions of compressed deltas a
device's copy is bit for bit the aggregator's shadow, within the stated bound of the true
model (half an int8 step of the latest delta), and exactly the true model after a full sync;
a delta for another version, or one whose result does not match, is refused."""

from __future__ import annotations

import numpy as np
import pytest
from fedge.protocol import CodecSpec, GlobalDeltaHeader, parse_codec
from fedge.protocol.downlink import DeltaMismatch, Shadow, apply_delta, checksum

pytestmark = pytest.mark.unit


def model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "dense0_kernel": rng.normal(0, 0.1, (64, 32)).astype(np.float32),
        "dense0_bias": np.zeros(32, np.float32),
    }


def walk(rng: np.random.Generator, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The next true model: a training step's worth of change."""
    return {k: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in weights.items()}


@pytest.mark.parametrize("codec", ["int8", "topk:0.1+int8"])
def test_fifty_versions_of_deltas_track_the_true_model_within_the_bound(codec: str) -> None:
    rng = np.random.default_rng(0)
    true = model(rng)
    shadow, device = Shadow(true, 0), dict(true)
    spec = parse_codec(codec)
    for version in range(1, 51):
        true = walk(rng, true)
        header, tensors = shadow.advance(
            true, version=version, round_id=version, spec=spec, fleet="f"
        )
        device = apply_delta(device, header, tensors)
        assert header.base_version == version - 1 and header.model_version == version
        for name in true:  # the device holds the aggregator's copy, bit for bit
            assert np.array_equal(device[name], shadow.weights[name])
        gap = max(float(np.abs(true[k] - device[k]).max()) for k in true)
        assert gap == pytest.approx(header.error_bound)
        if codec == "int8":
            # Error feedback: what is off is at most half a step of the latest delta's scale
            # (the largest entry of each tensor's delta over 127), whatever came before.
            step = (
                max(
                    float(np.abs(tensors[f"{k}/v"].astype(np.float32) * tensors[f"{k}/s"]).max())
                    for k in true
                )
                / 127
            )
            assert gap <= step / 2 + 1e-7
    shadow.sync(true, 50)  # a full sync: the whole model goes out
    assert checksum(shadow.weights) == checksum(true)
    header, tensors = shadow.advance(walk(rng, true), version=51, round_id=51, spec=spec, fleet="f")
    assert header.base_version == 50


def test_a_delta_for_other_weights_is_refused() -> None:
    rng = np.random.default_rng(1)
    weights = model(rng)
    shadow = Shadow(weights, 3)
    header, tensors = shadow.advance(
        walk(rng, weights), version=4, round_id=4, spec=CodecSpec("int8"), fleet="f"
    )
    other = walk(rng, weights)  # a device whose copy is not the aggregator's v3
    with pytest.raises(DeltaMismatch, match="bad_checksum"):
        apply_delta(other, header, tensors)
    with pytest.raises(DeltaMismatch, match="bad_delta"):
        apply_delta({"dense0_kernel": weights["dense0_kernel"]}, header, tensors)
    tampered = dict(tensors)
    tampered["dense0_bias/s"] = np.array([np.inf], np.float32)
    with pytest.raises(DeltaMismatch):
        apply_delta(weights, header, tampered)


def test_a_delta_goes_forward() -> None:
    with pytest.raises(ValueError, match="older version to a newer one"):
        GlobalDeltaHeader(
            fleet="f",
            base_version=5,
            model_version=5,
            round_id=1,
            codec="int8",
            checksum="0" * 16,
            error_bound=0.0,
        )

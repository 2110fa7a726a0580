"""Federated evaluation on the device: what is held out, and how it is scored."""

from __future__ import annotations

import numpy as np
import pytest
from fedge.agent.dataset import Dataset
from fedge.agent.evaluation import hold_out, score
from fedge.models.runtime import load_runtime
from helpers import DIGITS_MODEL, REPO

FORECASTER = REPO / "models" / "artifacts" / "machine_forecaster.tflite"

pytestmark = pytest.mark.unit


def data(n: int) -> Dataset:
    return Dataset(np.arange(n * 2, dtype=np.float32).reshape(n, 2), np.arange(n, dtype=np.int32))


def test_the_newest_examples_are_held_out() -> None:
    train, held = hold_out(data(100), 0.2, 10)
    assert held is not None
    assert list(train.y) == list(range(80)) and list(held.y) == list(range(80, 100))
    np.testing.assert_array_equal(held.x, data(100).x[80:])


def test_at_least_the_minimum_and_never_more_than_what_trains() -> None:
    train, held = hold_out(data(40), 0.1, 10)
    assert held is not None and len(held) == 10 and len(train) == 30
    train, held = hold_out(data(19), 0.1, 10)  # 10 held out would leave 9 to train on
    assert held is None and len(train) == 19
    train, held = hold_out(data(100), 0.0, 10)  # off
    assert held is None and len(train) == 100


def test_score_is_accuracy_for_labels_and_mae_for_targets() -> None:
    rt = load_runtime(DIGITS_MODEL, prefer=("numpy",))
    rng = np.random.default_rng(0)
    x = rng.random((12, 64), dtype=np.float32)
    labels = Dataset(x, rng.integers(0, 10, 12).astype(np.int32))
    ev = score(rt, labels)
    assert ev is not None and ev.count == 12 and ev.mae is None
    assert (ev.loss, ev.accuracy) == pytest.approx(rt.evaluate(labels.x, labels.y), abs=1e-6)
    forecaster = load_runtime(FORECASTER, prefer=("numpy",))
    inputs = forecaster.get_weights()["dense0_kernel"].shape[0]
    targets = Dataset(rng.random((12, inputs), dtype=np.float32), rng.random((12, 5), np.float32))
    ev = score(forecaster, targets)
    assert ev is not None and ev.count == 12 and ev.accuracy is None
    assert (ev.loss, ev.mae) == pytest.approx(forecaster.evaluate(targets.x, targets.y), abs=1e-6)


def test_a_diverged_model_is_not_scored() -> None:
    rt = load_runtime(DIGITS_MODEL, prefer=("numpy",))
    rt.set_weights({k: np.full_like(w, np.inf) for k, w in rt.get_weights().items()})
    rng = np.random.default_rng(0)
    held = Dataset(rng.random((12, 64), dtype=np.float32), np.zeros(12, np.int32))
    assert score(rt, held) is None

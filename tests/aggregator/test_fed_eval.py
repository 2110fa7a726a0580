"""Federated evaluation: the devices' scores combined, weighted by what each scored."""

from __future__ import annotations

import pytest
from fedge.aggregator.fed_eval import combine
from fedge.protocol import Evaluation

pytestmark = pytest.mark.unit


def test_scores_are_weighted_by_the_examples_each_device_scored() -> None:
    reports = {
        "a": Evaluation(count=10, loss=1.0, accuracy=0.5),
        "b": Evaluation(count=30, loss=0.2, accuracy=0.9),
    }
    out = combine(reports, {"a": 100, "b": 300}, model_version=4)
    assert out == {
        "model_version": 4,
        "devices": 2,
        "count": 40,
        "loss": pytest.approx(0.4),
        "accuracy": pytest.approx(0.8),
    }


def test_a_count_is_clipped_to_the_devices_weight_in_the_average() -> None:
    # b declared 10^6 evaluated examples; its samples were clipped to 20 in the average
    reports = {
        "a": Evaluation(count=20, loss=0.0, mae=1.0),
        "b": Evaluation(count=10**6, loss=0.0, mae=9.0),
    }
    out = combine(reports, {"a": 200, "b": 20}, model_version=0)
    assert out is not None and out["count"] == 40 and out["mae"] == pytest.approx(5.0)
    assert "accuracy" not in out


def test_no_reports_or_no_weight_means_no_score() -> None:
    assert combine({}, {"a": 5}, model_version=1) is None
    assert combine({"x": Evaluation(count=3, loss=0.1, accuracy=1.0)}, {}, model_version=1) is None

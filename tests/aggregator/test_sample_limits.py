"""A device cannot outweigh the fleet by claiming samples it does not have."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fedge.aggregator.config import SampleLimits
from fedge.aggregator.sample_limits import bound_samples
from fedge.protocol import MemoryBroker, SkipNotice, encode_skip
from hypothesis import given
from hypothesis import strategies as st
from test_coordinator import Clock, Device, close_stores, delta, make, pump  # noqa: F401

pytestmark = pytest.mark.unit


def test_a_liar_is_clipped_to_a_multiple_of_the_median() -> None:
    out = bound_samples({"a": 100, "b": 120, "liar": 10**9}, median_factor=3.0)
    assert out.used == {"a": 100, "b": 120, "liar": 360}
    assert out.clipped == {"liar": 10**9}


def test_per_device_and_fleet_caps_apply_and_the_smallest_wins() -> None:
    out = bound_samples(
        {"a": 500, "b": 500, "c": 50}, caps={"a": 200}, max_per_device=400, median_factor=0
    )
    assert out.used == {"a": 200, "b": 400, "c": 50}
    assert out.clipped == {"a": 500, "b": 500}
    assert bound_samples({"a": 7}).used == {"a": 7}  # nothing configured: nothing clipped


def test_with_two_devices_the_liar_is_clipped_to_the_honest_count() -> None:
    # The lower median: a liar must be more than half of the round to raise it.
    assert bound_samples({"a": 100, "liar": 10**9}, median_factor=3.0).used["liar"] == 300
    out = bound_samples({"a": 100, "b": 100, "x": 10**9, "y": 10**9}, median_factor=3.0)
    assert out.used == {"a": 100, "b": 100, "x": 300, "y": 300}


@given(st.dictionaries(st.text("abc", min_size=1, max_size=3), st.integers(1, 2**32 - 1)))
def test_bounded_counts_never_grow_and_counts_under_the_cap_are_kept(declared: dict) -> None:
    import statistics

    out = bound_samples(declared, median_factor=3.0)
    cap = int(3.0 * statistics.median_low(declared.values())) if declared else 0
    for device, count in declared.items():
        assert out.used[device] == min(count, max(1, cap))
    assert set(out.clipped) == {d for d in declared if out.used[d] < declared[d]}


@pytest.mark.link
def test_a_device_claiming_a_billion_samples_moves_the_model_only_as_its_cap_allows(
    tmp_path: Path,
) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=3, rounds=2, samples=SampleLimits())
    a, b, liar = Device(broker, "a"), Device(broker, "b"), Device(broker, "liar")
    pump(agg)
    a.send(1, delta(0.0), 100)
    b.send(1, delta(0.0), 100)
    liar.send(1, delta(1.0), 10**9)
    pump(agg)
    # FedAvg with the liar capped at 3 x the median (300 of 500 samples): 0.6, not ~1.0.
    np.testing.assert_allclose(agg.weights["w"], 0.6, rtol=1e-6)
    # The same through a skip notice claiming 2^32-1 samples: capped as well.
    skip = SkipNotice(
        device_id="liar",
        round_id=2,
        update_id="00000000000000aa",
        reason="small_update",
        trained=True,
        num_samples=2**32 - 1,
    )
    liar.link.publish("fedge/v1/unit/update/liar", encode_skip(skip))
    a.send(2, delta(1.0), 100, base=1)
    b.send(2, delta(1.0), 100, base=1)
    pump(agg)
    np.testing.assert_allclose(agg.weights["w"], 0.6 + 200 / 500, rtol=1e-6)
    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert rounds[0]["weights"] == {"a": 100, "b": 100, "liar": 300}
    assert rounds[0]["samples_clipped"] == {"liar": 10**9}
    assert rounds[1]["weights"] == {"a": 100, "b": 100, "liar": 300}
    assert rounds[1]["samples_clipped"] == {"liar": 2**32 - 1}
    assert agg.samples_clipped == 2


@pytest.mark.link
def test_caps_and_revocations_from_the_registry(tmp_path: Path) -> None:
    registry = tmp_path / "devices.json"
    devices = {"a": {"max_samples": 50}, "gone": {"max_samples": 9, "revoked": True}}
    registry.write_text(json.dumps({"fleet": "unit", "devices": devices}))
    from fedge.aggregator.config import AggregatorConfig
    from fedge.aggregator.service import load_registry
    from helpers import DIGITS_MODEL

    limits = SampleLimits(registry=registry, caps={"b": 7})
    cfg = AggregatorConfig(model=DIGITS_MODEL, samples=limits)
    assert load_registry(cfg) == ({"a": 50, "b": 7}, {"gone"})


@pytest.mark.link
def test_a_revoked_device_is_never_online_or_selected(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=2)
    agg.revoked = frozenset({"gone"})
    Device(broker, "a")
    Device(broker, "gone")  # both retain "online"
    pump(agg)
    assert agg.online == {"a"} and agg.current is None and agg.rejected["revoked"] == 1
    Device(broker, "b")
    pump(agg)
    assert agg.current is not None and agg.current.selected == ["a", "b"]

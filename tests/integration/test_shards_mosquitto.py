"""Aggregator shards over a real Mosquitto: two workers share the update topic through an
MQTT shared subscription, a coordinator merges their partial sums, and the global model is
the one a single aggregator makes of the same updates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fedge.fleet.shardrun import replay_single, sharded_run

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_two_workers_four_agents_give_the_single_aggregators_model(
    tmp_path: Path,
    mosquitto,  # type: ignore[no-untyped-def]
    fleet_id: str,
) -> None:
    run = sharded_run(
        mosquitto.url, tmp_path, fleet=fleet_id, workers=2, devices=4, rounds=2, timeout=120
    )
    assert [r["status"] for r in run.rounds] == ["done", "done"]
    assert all(len(r["participants"]) == 4 for r in run.rounds)
    assert all(n > 0 for n in run.accepted.values()), run.accepted  # the broker shared them
    assert sum(run.accepted.values()) == 8
    weights, single = replay_single(run)
    for a, b in zip(run.rounds, single, strict=True):
        assert a["participants"] == b["participants"] and a["weights"] == b["weights"]
        assert a["bytes_received"] == b["bytes_received"]
    for name, w in weights.items():
        assert np.max(np.abs(run.weights[name] - w)) <= 1e-6
        assert not np.allclose(w, 0)

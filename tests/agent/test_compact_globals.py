"""Compact globals end to end over the in-memory link: a real aggregator with [downlink]
sends deltas between full syncs, real agents apply them and hold the aggregator's copy bit
for bit, a device that missed a delta asks for the whole model and gets back in step, and
what a device downloads per round shrinks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fedge.agent.daemon import Agent
from fedge.agent.dataset import Dataset
from fedge.aggregator.config import AggregatorConfig
from fedge.aggregator.coordinator import Aggregator
from fedge.aggregator.store import Store
from fedge.aggregator.strategies.config import StrategyConfig
from fedge.models.runtime import load_runtime
from fedge.protocol import GateSettings, MemoryBroker, MemoryLink, TrainingConfig
from helpers import DIGITS_MODEL, serve_rounds

pytestmark = pytest.mark.link
FLEET = "compact"


def agent(broker: MemoryBroker, device: str, seed: int) -> Agent:
    rng = np.random.default_rng(seed)
    a = Agent(
        device_id=device,
        fleet=FLEET,
        link=MemoryLink(broker, device),
        runtime=load_runtime(DIGITS_MODEL, prefer=("numpy",)),
        data=Dataset(rng.random((40, 64), np.float32), rng.integers(0, 10, 40).astype(np.int32)),
        rng=np.random.default_rng(seed),
    )
    a.start()
    return a


def test_devices_follow_the_model_by_deltas_and_resync(tmp_path: Path) -> None:
    broker = MemoryBroker()
    config = AggregatorConfig(
        fleet=FLEET,
        model=DIGITS_MODEL,
        state_dir=tmp_path,
        min_devices=2,
        rounds=7,
        training=TrainingConfig(
            batch_size=8, lr=0.1, codec="float32", gate=GateSettings(threshold=0), eval_fraction=0
        ),
        strategy=StrategyConfig(name="fedavg"),
        downlink={"codec": "int8", "resync_every": 100},
    )
    store = Store(tmp_path / "agg.sqlite")
    agg = Aggregator(
        config,
        link=MemoryLink(broker, "aggregator"),
        store=store,
        initial_weights=load_runtime(DIGITS_MODEL).get_weights(),
    )
    try:
        agg.start()
        devices = [agent(broker, "a", 1), agent(broker, "b", 2)]
        serve_rounds(agg, devices, 3)
        assert agg.shadow is not None
        for d in devices:  # each holds the aggregator's copy of v3, bit for bit
            assert d.global_version == agg.version == 3
            for name, w in agg.shadow.weights.items():
                assert np.array_equal(d.global_weights[name], w)
        # Joins now with another installed model: no whole model was sent (a and b had v0 in
        # their model file), and the retained delta goes from v2.
        late = agent(broker, "c", 3)
        late.runtime.set_weights({k: v + 1 for k, v in late.runtime.get_weights().items()})
        while late.step(0):
            pass
        assert late.global_version == -1 and late.stats.rejected["delta_gap"] == 1
        serve_rounds(agg, [*devices, late], 7)  # it asks for the whole model, and keeps up after
        assert agg.republished == 1 and late.global_version == agg.version == 7
        for d in [*devices, late]:
            for name, w in agg.shadow.weights.items():
                assert np.array_equal(d.global_weights[name], w)
        lines = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
        sent = [r["downlink"]["sent"] for r in lines]
        assert sent == ["delta"] * 7  # (v3 went out whole again when c asked)
        assert all(0 < r["downlink"]["error_bound"] < 1e-3 for r in lines)
        # Round 1 trained on v0, the installed model: only the announcement came down; round 2
        # on v1, a delta (int8: about a quarter of the 19.6 kB float32 model).
        whole = sum(w.nbytes for w in agg.weights.values())
        assert lines[0]["bytes_down_per_device"] < 1000
        assert lines[1]["bytes_down_per_device"] - lines[0]["bytes_down_per_device"] > 1000
        assert lines[1]["bytes_down_per_device"] < 0.35 * whole
    finally:
        store.close()

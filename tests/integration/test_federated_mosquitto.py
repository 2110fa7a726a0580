"""Aggregator + 3 agents over a real Mosquitto: federated averaging is exact, round by round.

A separate observer client records every update the devices publish and every global
model; after the run, each global model must equal the previous one plus the
sample-weighted mean of the deltas the aggregator says it accepted in that round.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from fedge.agent.config import AgentConfig
from fedge.agent.service import build_agent
from fedge.aggregator.config import AggregatorConfig
from fedge.aggregator.service import build_aggregator
from fedge.aggregator.strategies.config import StrategyConfig
from fedge.protocol import (
    GateSettings,
    GlobalModelHeader,
    Topics,
    TrainingConfig,
    UpdateHeader,
    decode,
    make_link,
)
from helpers import DIGITS_MODEL, digits_partitions

pytestmark = [pytest.mark.broker, pytest.mark.slow]
ROUNDS = 3


def test_three_agents_three_rounds_exact_fedavg(tmp_path: Path, mosquitto, fleet_id: str) -> None:  # type: ignore[no-untyped-def]
    parts, test = digits_partitions(tmp_path, 3, seed=1)
    # Unequal data: drop samples so that sample weighting matters.
    for i, p in enumerate(parts):
        with np.load(p) as npz:
            keep = len(npz["y"]) // (i + 1)
            np.savez(p, x=npz["x"][:keep], y=npz["y"][:keep])
    topics = Topics(fleet_id)
    observer = make_link(mosquitto.url, f"{fleet_id}-observer"[:64])
    observer.connect()
    observer.subscribe(topics.updates)
    observer.subscribe(topics.global_model)

    agg_cfg = AggregatorConfig(
        fleet=fleet_id,
        broker=mosquitto.url,
        client_id="agg-" + fleet_id[-8:],
        model=DIGITS_MODEL,
        state_dir=tmp_path / "agg",
        rounds=ROUNDS,
        min_devices=3,
        quorum=1.0,
        round_timeout=60,
        # float32 and no gate: this test checks the averaging arithmetic on exact deltas.
        training=TrainingConfig(
            epochs=2, batch_size=16, lr=0.1, codec="float32", gate=GateSettings(threshold=0)
        ),
        strategy=StrategyConfig(name="fedavg"),
        eval_data=test,
    )
    agg = build_aggregator(agg_cfg)
    agents = [
        build_agent(
            AgentConfig(
                device_id=f"d{i}-{fleet_id[-8:]}",
                fleet=fleet_id,
                broker=mosquitto.url,
                model=DIGITS_MODEL,
                data=p,
                state_dir=tmp_path / "agents",
                seed=i,
            )
        )
        for i, p in enumerate(parts)
    ]
    stop = threading.Event()
    agg.start()
    threads = []
    for a in agents:
        a.start()
        threads.append(threading.Thread(target=a.run, args=(stop,), daemon=True))
        threads[-1].start()
    worker = threading.Thread(target=agg.run, args=(stop,), daemon=True)
    worker.start()
    worker.join(120)
    stop.set()
    for t in threads:
        t.join(10)
    for a in agents:
        a.stop()
    agg.link.close()
    agg.store.close()
    assert agg.done, "aggregator did not finish its rounds"

    globals_: dict[int, dict[str, np.ndarray]] = {}
    updates: dict[int, dict[str, tuple[int, dict[str, np.ndarray]]]] = {}
    while (msg := observer.get(2.0)) is not None:
        d = decode(msg.payload)
        if isinstance(d.msg, GlobalModelHeader):
            globals_[d.msg.model_version] = d.tensors
        elif isinstance(d.msg, UpdateHeader):
            updates.setdefault(d.msg.round_id, {})[d.msg.device_id] = (d.msg.num_samples, d.tensors)
    observer.close()

    rounds = [json.loads(line) for line in agg_cfg.log_path.read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3] and all(r["status"] == "done" for r in rounds)
    assert sorted(globals_) == [0, 1, 2, 3]
    counts = {n for r in updates.values() for n, _ in r.values()}
    assert len(counts) == 3  # three different sample counts: weighting is exercised
    for r in rounds:
        accepted = r["participants"]
        assert len(accepted) == 3
        prev, new = globals_[r["model_version"] - 1], globals_[r["model_version"]]
        total = sum(updates[r["round"]][d][0] for d in accepted)
        for name in prev:
            expected = prev[name].astype(np.float64) + sum(
                updates[r["round"]][d][1][name].astype(np.float64)
                * updates[r["round"]][d][0]
                / total
                for d in accepted
            )
            np.testing.assert_allclose(new[name], expected.astype(np.float32), rtol=0, atol=1e-6)
            assert not np.allclose(new[name], prev[name])  # the round moved the model
        assert r["bytes_received"] > 0 and 0 <= r["accuracy"] <= 1
    assert rounds[-1]["loss"] < rounds[0]["loss"]

"""fedge unchanged on a clustered broker: three nats-server nodes speaking MQTT 3.1.1.

The devices connect to nodes 1 and 2, the aggregator to node 3, so every announcement, update,
heartbeat and global model crosses a cluster route; NATS keeps sessions and retained messages in
replicated JetStream streams. The rounds must complete with every device, the model must learn,
and a device that connects to another node after the run must catch up from the retained
global model that the aggregator published through node 3.

nats-server 2.9.10 (Debian's) refuses '.' in MQTT topics, which fedge ids allow: the link says
so in its error instead of a bare refusal or a connection that never comes up.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from fedge.agent.config import AgentConfig
from fedge.agent.daemon import Agent
from fedge.agent.service import build_agent
from fedge.aggregator.config import AggregatorConfig
from fedge.aggregator.service import HeldOutEvaluator, build_aggregator
from fedge.aggregator.strategies.config import StrategyConfig
from fedge.models.runtime import load_runtime
from fedge.protocol import GateSettings, LinkError, Message, TrainingConfig
from fedge.protocol.paho_link import PahoLink
from helpers import DIGITS_MODEL, digits_partitions
from nats_cluster import NatsNode

pytestmark = [pytest.mark.broker, pytest.mark.slow]
ROUNDS = 2


def test_rounds_complete_across_three_nats_nodes_and_a_late_device_catches_up(
    tmp_path: Path,
    nats_cluster,  # type: ignore[no-untyped-def]
    fleet_id: str,
) -> None:
    n1, n2, n3 = nats_cluster.nodes
    parts, test = digits_partitions(tmp_path, 4, seed=2)
    cfg = AggregatorConfig(
        fleet=fleet_id,
        broker=n3.url,
        client_id="agg-" + fleet_id[-8:],
        model=DIGITS_MODEL,
        state_dir=tmp_path / "agg",
        rounds=ROUNDS,
        min_devices=3,
        quorum=1.0,
        round_timeout=10,  # a round that lost a message to NATS fails soon
        training=TrainingConfig(
            epochs=2, batch_size=16, lr=0.1, codec="float32", gate=GateSettings(threshold=0)
        ),
        strategy=StrategyConfig(name="fedavg"),
        eval_data=test,
    )

    def agent(i: int, node: NatsNode) -> Agent:
        return build_agent(
            AgentConfig(
                device_id=f"d{i}-{fleet_id[-8:]}",
                fleet=fleet_id,
                broker=node.url,
                model=DIGITS_MODEL,
                data=parts[i],
                state_dir=tmp_path / "agents",
                seed=i,
            )
        )

    agg = build_aggregator(cfg)
    agents = [agent(0, n1), agent(1, n2), agent(2, n1)]
    late = agent(3, n2)  # never in a round: it connects to node 2 after the run
    started = []
    stop = threading.Event()
    threads = []
    try:
        agg.start()
        for a in agents:
            a.start()
            started.append(a)
            threads.append(threading.Thread(target=a.run, args=(stop,), daemon=True))
            threads[-1].start()
        worker = threading.Thread(target=agg.run, args=(stop,), daemon=True)
        worker.start()
        worker.join(60)
        assert agg.done, f"the rounds did not complete over the NATS cluster\n{nats_cluster.logs()}"

        late.start()
        started.append(late)
        deadline = time.monotonic() + 20
        while late.global_version < ROUNDS and time.monotonic() < deadline:
            late.step(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for a in started:
            a.stop()
        agg.link.close()
        agg.store.close()

    assert late.global_version == ROUNDS, (
        f"the late device has model v{late.global_version}, not v{ROUNDS}\n{nats_cluster.logs()}"
    )
    late_weights = late.runtime.get_weights()
    assert late_weights.keys() == agg.weights.keys()
    assert all((late_weights[k] == agg.weights[k]).all() for k in late_weights)

    rounds = [json.loads(line) for line in cfg.log_path.read_text().splitlines()]
    done = [r for r in rounds if r["status"] == "done"]
    devices = sorted(a.device_id for a in agents)
    assert len(done) == ROUNDS and all(sorted(r["participants"]) == devices for r in done)
    # Under CPU load nats-server 2.9.10 now and then does not deliver a round announcement to one
    # device (docs/brokers.md); that round fails at its deadline and the next one completes.
    assert len(rounds) - len(done) <= 1, rounds
    initial = load_runtime(DIGITS_MODEL).get_weights()
    _, accuracy_before = HeldOutEvaluator.from_file(DIGITS_MODEL, test)(initial)
    assert accuracy_before < done[0]["accuracy"] < done[1]["accuracy"]  # 0.12, 0.77, 0.87
    assert done[0]["loss"] > done[1]["loss"]


def test_ids_with_a_dot_fail_with_a_reason_on_this_nats(
    nats_cluster,  # type: ignore[no-untyped-def]
    fleet_id: str,
) -> None:
    node = nats_cluster.nodes[0]
    link = PahoLink(node.host, node.mqtt_port, "agg-" + fleet_id[-8:])
    link.connect()
    try:
        with pytest.raises(LinkError, match=r"refused subscription .*'\.' in MQTT topics"):
            link.subscribe(f"fedge/v1/site.{fleet_id[-8:]}/update/+")
    finally:
        link.close()
    will = Message(f"fedge/v1/{fleet_id[-8:]}/status/pi.kitchen", b"offline", retain=True)
    device = PahoLink(node.host, node.mqtt_port, "pi.kitchen-" + fleet_id[-8:], will=will)
    with pytest.raises(LinkError, match=r"cannot connect, .*'\.' in MQTT topics"):
        device.connect(timeout=2)

"""Prometheus metrics: the collectors read a real agent and aggregator; over Mosquitto, both
``/metrics`` endpoints are scraped during a run and after it, and the counters move."""

from __future__ import annotations

import math
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fedge.agent.daemon import Agent, AgentStats
from fedge.agent.dataset import Dataset
from fedge.aggregator.config import AggregatorConfig
from fedge.aggregator.coordinator import Aggregator
from fedge.aggregator.service import build_aggregator
from fedge.aggregator.strategies.config import StrategyConfig
from fedge.models.runtime import load_runtime
from fedge.protocol import GateSettings, MemoryBroker, MemoryLink, TrainingConfig
from helpers import DIGITS_MODEL, broker_agents, digits_partitions, serve_in_threads
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from fedge.metrics import AgentCollector, AggregatorCollector, RoundRecorder, serve_metrics

TRAINING = TrainingConfig(
    epochs=1, batch_size=16, lr=0.1, codec="float32", gate=GateSettings(threshold=0)
)


def registry(*collectors: Collector) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    for c in collectors:
        reg.register(c)
    return reg


def value(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


def memory_round(tmp_path: Path) -> Iterator[tuple[Aggregator, RoundRecorder, list[Agent]]]:
    """An aggregator and two agents on the in-memory link, after one round (a generator: the
    aggregator's store is closed when it resumes)."""
    parts, test = digits_partitions(tmp_path, 2, seed=3)
    broker = MemoryBroker()
    rounds = RoundRecorder()
    cfg = AggregatorConfig(
        fleet="metrics",
        model=DIGITS_MODEL,
        state_dir=tmp_path / "agg",
        rounds=1,
        min_devices=2,
        quorum=1.0,
        round_timeout=30,
        training=TRAINING,
        strategy=StrategyConfig(name="fedavg"),
        eval_data=test,
    )
    agg = build_aggregator(cfg, link=MemoryLink(broker, "aggregator"), on_round=rounds)
    agents = []
    for i, part in enumerate(parts):
        with np.load(part) as npz:
            data = Dataset(npz["x"], npz["y"])
        agent = Agent(
            device_id=f"d{i}",
            fleet="metrics",
            link=MemoryLink(broker, f"d{i}", will=Agent.will(f"d{i}", "metrics")),
            runtime=load_runtime(DIGITS_MODEL),
            data=data,
            rng=np.random.default_rng(i),
        )
        agent.start()
        agents.append(agent)
    agg.start()
    try:
        for _ in range(200):
            agg.step(0)
            for agent in agents:
                while agent.step(0):
                    pass
            if agg.done:
                break
        for agent in agents:  # the new global model
            while agent.step(0):
                pass
        assert agg.done
        yield agg, rounds, agents
    finally:
        agg.store.close()


@pytest.mark.link
def test_collectors_read_a_real_agent_and_aggregator(tmp_path: Path) -> None:
    for agg, rounds, agents in memory_round(tmp_path):
        reg = registry(AggregatorCollector(agg, rounds), AgentCollector(agents[0]))
        assert value(reg, "fedge_aggregator_rounds_total", status="done") == 1
        assert value(reg, "fedge_aggregator_rounds_total", status="failed") == 0
        assert value(reg, "fedge_aggregator_model_version") == agg.version == 1
        assert value(reg, "fedge_aggregator_devices_online") == 2
        assert value(reg, "fedge_aggregator_round_participants") == 2
        assert value(reg, "fedge_aggregator_round_missing") == 0
        assert 0 <= (value(reg, "fedge_aggregator_accuracy_ratio") or -1) <= 1
        # federated evaluation: each device scored model v0 on its newest examples
        held = sum(math.ceil(0.1 * len(a.data)) for a in agents)  # type: ignore[arg-type]
        assert value(reg, "fedge_aggregator_federated_eval_samples") == held > 20
        assert 0 <= (value(reg, "fedge_aggregator_federated_accuracy_ratio") or -1) <= 1
        assert (value(reg, "fedge_aggregator_federated_loss") or -1) > 0
        assert value(reg, "fedge_aggregator_federated_mae") is None
        assert (value(reg, "fedge_aggregator_round_duration_seconds") or -1) >= 0
        assert (value(reg, "fedge_aggregator_round_received_bytes") or 0) > 0
        assert value(reg, "fedge_aggregator_mqtt_bytes_received_total") == agg.link.bytes_down > 0
        assert value(reg, "fedge_agent_rounds_trained_total") == 1
        assert value(reg, "fedge_agent_model_version") == 1
        assert value(reg, "fedge_agent_last_round") == 1
        assert value(reg, "fedge_agent_update_bytes_sent_total") == agents[0].stats.bytes_sent > 0
        assert value(reg, "fedge_agent_mqtt_bytes_sent_total") == agents[0].link.bytes_up
        assert value(reg, "fedge_agent_mqtt_bytes_received_total") == agents[0].link.bytes_down
        assert value(reg, "fedge_agent_anomaly_score") is None  # a classifier: no score
        assert value(reg, "fedge_agent_train_loss") == agents[0].last_train_loss > 0
        assert value(reg, "fedge_agent_cpu_temperature_celsius") is None  # nothing read
        agents[0].readings = lambda: {"battery_percent": 40.0, "cpu_temp_c": 55.0}
        assert value(reg, "fedge_agent_battery_ratio") == 0.4
        assert value(reg, "fedge_agent_cpu_temperature_celsius") == 55.0
        # Counts by reason show up as the loop counts them, with no call of its own.
        agents[0].stats.skipped["battery_low"] += 2
        agg.rejected["bad_signature"] += 1
        assert value(reg, "fedge_agent_updates_skipped_total", reason="battery_low") == 2
        assert value(reg, "fedge_aggregator_messages_rejected_total", reason="bad_signature") == 1


@pytest.mark.unit
def test_off_unless_a_port_is_set() -> None:
    assert serve_metrics([], 0) is None and serve_metrics([], None) is None


def test_a_port_in_use_is_a_config_error_naming_the_setting() -> None:
    import socket

    from fedge.configfile import ConfigError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as err:
            serve_metrics([], port)
    [line] = err.value.problems
    assert line.startswith(f"metrics_port: cannot serve metrics on 127.0.0.1:{port}")


def scrape(port: int) -> dict[str, float]:
    """Every sample of ``http://127.0.0.1:port/metrics``, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


DONE = "fedge_aggregator_rounds_total{status=done}"


def wait_for(port: int, name: str, above: float, deadline: float) -> dict[str, float]:
    while time.monotonic() < deadline:
        seen = scrape(port)
        if seen.get(name, 0) > above:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"{name} stayed at or below {above}")


@pytest.mark.broker
def test_both_endpoints_move_during_a_run_over_mosquitto(
    tmp_path: Path,
    mosquitto,  # type: ignore[no-untyped-def]
    fleet_id: str,
    request: pytest.FixtureRequest,
) -> None:
    from mosquitto import free_port

    parts, _ = digits_partitions(tmp_path, 2, seed=5)
    rounds = RoundRecorder()
    agg = build_aggregator(
        AggregatorConfig(
            fleet=fleet_id,
            broker=mosquitto.url,
            client_id="agg-" + fleet_id[-8:],
            model=DIGITS_MODEL,
            state_dir=tmp_path / "agg",
            min_devices=2,
            quorum=1.0,
            round_timeout=30,
            training=TRAINING,
            strategy=StrategyConfig(name="fedavg"),
        ),
        on_round=rounds,
    )
    agents = broker_agents(
        parts,
        fleet=fleet_id,
        broker=mosquitto.url,
        state_dir=tmp_path / "agents",
        prefix=f"m{fleet_id[-8:]}-",
    )
    agg_port, agent_port = free_port(), free_port()
    for server in (
        serve_metrics([AggregatorCollector(agg, rounds)], agg_port),
        serve_metrics([AgentCollector(agents[0])], agent_port),
    ):
        assert server is not None
        request.addfinalizer(server.close)
    stop = threading.Event()
    threads = serve_in_threads(agg, agents, stop)
    try:
        deadline = time.monotonic() + 60
        first = wait_for(agg_port, DONE, 0, deadline)
        dev_first = scrape(agent_port)
        # Still running: it moves. Two rounds on: the next round's updates may have come in
        # before ``first`` was scraped (a round takes tens of ms), the one after cannot have.
        later = wait_for(agg_port, DONE, first[DONE] + 1, deadline)
        assert (
            later["fedge_aggregator_mqtt_bytes_received_total"]
            > first["fedge_aggregator_mqtt_bytes_received_total"]
        )
        assert later["fedge_aggregator_model_version"] > first["fedge_aggregator_model_version"]
        assert later["fedge_aggregator_round_participants"] == 2
        dev_later = wait_for(
            agent_port,
            "fedge_agent_rounds_trained_total",
            dev_first["fedge_agent_rounds_trained_total"],
            deadline,
        )
        assert (
            dev_later["fedge_agent_mqtt_bytes_sent_total"]
            > dev_first["fedge_agent_mqtt_bytes_sent_total"]
        )
        assert dev_later["fedge_agent_update_bytes_sent_total"] > 0
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for a in agents:
            a.stop()
        agg.link.close()
        agg.store.close()
    after = scrape(agg_port)  # after the run: the last values stay readable
    assert after[DONE] >= later[DONE] and after[DONE] == agg.completed
    assert scrape(agent_port)["fedge_agent_rounds_trained_total"] >= 2


@pytest.mark.unit
def test_serial_counters_faults_and_store_size_are_metrics() -> None:
    sensor = SimpleNamespace(
        counters={"samples": 120, "bytes": 4800, "crc": 3, "resync": 1},
        decoder=SimpleNamespace(faults={"crc": 3, "resync": 1}),
        store_bytes=65536,
    )
    agent = SimpleNamespace(
        stats=AgentStats(),
        link=SimpleNamespace(bytes_up=0, bytes_down=0),
        state=SimpleNamespace(last_round=0),
        last_update_bytes=0,
        global_version=-1,
        anomaly_score=None,
        last_train_loss=None,
        readings=None,
        sensor=sensor,
    )
    reg = registry(AgentCollector(agent))
    assert value(reg, "fedge_agent_serial_samples_total") == 120
    assert value(reg, "fedge_agent_serial_bytes_total") == 4800
    assert value(reg, "fedge_agent_serial_frame_faults_total", kind="crc") == 3
    assert value(reg, "fedge_agent_serial_crc_total") is None  # a fault is a label, not a name
    assert value(reg, "fedge_agent_store_size_bytes") == 65536


@pytest.mark.unit
def test_the_last_rounds_epsilon_is_a_gauge_under_dp() -> None:
    from fedge.metrics import _last_round

    base = {"round": 3, "status": "done"}
    names = {m.name: m for m in _last_round(base)}
    assert "fedge_aggregator_privacy_epsilon" not in names
    spent = base | {"privacy": {"epsilon": 2.5, "delta": 1e-5}}
    gauges = {m.name: m for m in _last_round(spent)}
    assert gauges["fedge_aggregator_privacy_epsilon"].samples[0].value == 2.5

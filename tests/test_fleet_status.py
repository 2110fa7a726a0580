"""`fedge status`: the fleet table from the retained JSON statuses, over a real Mosquitto."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fedge.agent.service import status_line
from fedge.aggregator.config import AggregatorConfig
from fedge.aggregator.service import build_aggregator
from fedge.aggregator.strategies.config import StrategyConfig
from fedge.protocol import GateSettings, Status, Topics, TrainingConfig
from fedge.protocol.status import encode_status
from helpers import DIGITS_MODEL, broker_agents, digits_partitions, serve_in_threads

from fedge.configfile import ConfigError
from fedge.status import FleetView, WatchConfig, load, run, table

TRAINING = TrainingConfig(
    epochs=1, batch_size=16, lr=0.1, codec="float32", gate=GateSettings(threshold=0)
)


def fedge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedge.cli", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.broker
def test_lists_three_agents_with_their_versions_and_a_stopped_one_offline(
    tmp_path: Path,
    mosquitto,  # type: ignore[no-untyped-def]
    fleet_id: str,
) -> None:
    parts, _ = digits_partitions(tmp_path, 4, seed=7)
    tag = fleet_id[-8:]
    agg = build_aggregator(
        AggregatorConfig(
            fleet=fleet_id,
            broker=mosquitto.url,
            client_id=f"agg-{tag}",
            model=DIGITS_MODEL,
            state_dir=tmp_path / "agg",
            rounds=1,
            min_devices=4,
            quorum=1.0,
            round_timeout=30,
            training=TRAINING,
            strategy=StrategyConfig(name="fedavg"),
        )
    )
    agents = broker_agents(
        parts,
        fleet=fleet_id,
        broker=mosquitto.url,
        state_dir=tmp_path / "agents",
        prefix=f"s{tag}-",
    )
    stop = threading.Event()
    threads = serve_in_threads(agg, agents, stop)
    try:
        deadline = time.monotonic() + 60
        while not (agg.done and all(a.global_version == 1 for a in agents)):
            assert time.monotonic() < deadline, "the round did not complete"
            time.sleep(0.05)
        time.sleep(0.3)  # the last statuses on their way
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    for a in agents[:3]:
        a.link.close()  # gone without a word: their last status stays retained
    agents[3].stop()  # a clean stop says "offline"
    agg.link.close()
    agg.store.close()

    shown = fedge("status", "--broker", mosquitto.url, "--fleet", fleet_id, "--wait", "5")
    assert shown.returncode == 0, shown.stderr
    rows = {line.split()[0]: line.split() for line in shown.stdout.splitlines()[1:-1]}
    assert sorted(rows) == sorted(a.device_id for a in agents)
    for a in agents[:3]:
        _, state, model, last_round, outcome = rows[a.device_id][:5]
        assert (state, model, last_round, outcome) == ("idle", "v1", "1", "sent")
    assert rows[agents[3].device_id][1:3] == ["offline", "v1"]
    assert shown.stdout.splitlines()[-1] == f"4 device(s) in fleet {fleet_id}: 3 online, 1 offline"

    as_json = fedge("status", "--broker", mosquitto.url, "--fleet", fleet_id, "--json")
    records = {r["device_id"]: r for r in json.loads(as_json.stdout)}
    assert {r["state"] for r in records.values()} == {"idle", "offline"}
    first = records[agents[0].device_id]
    assert first["model_version"] == 1 and first["agent_version"] and first["bytes_up_today"] > 0


@pytest.mark.unit
def test_the_sensor_column_counts_faults_not_reads() -> None:
    topics = Topics("f")
    view = FleetView(topics, clock=lambda: 0.0)
    sensor = {"bytes": 45_000, "samples": 1000, "batches": 9, "opens": 1, "bad_crc": 2}
    sensor |= {"seq_gap": 3, "disconnects": 1}
    status = Status(device_id="a", state="idle", timestamp=100.0, sensor=sensor)
    view.take(topics.status("a"), encode_status(status))
    assert "1000 / 6 faults" in table(view, now=160.0).splitlines()[1]


@pytest.mark.unit
def test_an_unreadable_status_is_shown_not_dropped() -> None:
    topics = Topics("f")
    view = FleetView(topics, clock=lambda: 0.0)
    good = Status(device_id="a", state="idle", timestamp=100.0, model_version=3, last_round=3)
    view.take(topics.status("a"), encode_status(good))
    view.take(topics.status("b"), b'{"kind":"status","device_id":"b"}')
    view.take(topics.status("c"), encode_status(good))  # a says it is a, on c's topic
    view.take("elsewhere/x", b"{}")
    text = table(view, now=160.0)
    lines = text.splitlines()
    assert lines[1].split()[:4] == ["a", "idle", "v3", "3"] and lines[1].endswith("60s")
    assert lines[2].startswith("b") and "unreadable (schema)" in lines[2]
    assert "unreadable (says it is a)" in lines[3]
    assert lines[-1] == "3 device(s) in fleet f: 1 online, 0 offline, 2 unreadable"


@pytest.mark.unit
def test_needs_a_broker_and_a_fleet_and_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="give --broker URL and --fleet FLEET"):
        load(None, "mqtt://127.0.0.1:1", None)
    with pytest.raises(ConfigError, match="--broker: String should match"):
        load(None, "http://x", "f")
    cfg = tmp_path / "agent.toml"
    cfg.write_text('device_id = "d"\nfleet = "f1"\nbroker = "mqtt://10.0.0.2:1883"\n')
    assert load(cfg, None, None) == WatchConfig(fleet="f1", broker="mqtt://10.0.0.2:1883")
    assert load(cfg, None, "f2").fleet == "f2"
    missing = fedge("status", "--fleet", "f")
    assert missing.returncode == 78 and missing.stderr.startswith("fedge: error: give --broker")


@pytest.mark.unit
def test_systemd_status_line() -> None:
    sent = Status(
        device_id="d", state="idle", timestamp=1.0, model_version=12, last_round=12, outcome="sent"
    )
    assert status_line(sent, 1900) == "idle; round 12: sent 1.9 kB; model v12"
    skipped = Status(
        device_id="d",
        state="idle",
        timestamp=1.0,
        model_version=12,
        last_round=13,
        outcome="skipped",
        skip_reason="battery_low",
    )
    assert status_line(skipped, 0) == "idle; round 13: skipped (battery_low); model v12"
    assert status_line(Status(device_id="d", state="online", timestamp=0.0), 0) == (
        "online; no model yet"
    )


@pytest.mark.unit
def test_an_empty_fleet_exits_1() -> None:
    class Quiet:
        def get(self, timeout: float | None) -> None:
            time.sleep(timeout or 0)

        def close(self) -> None:
            pass

    out = io.StringIO()
    code = run(WatchConfig(fleet="f", broker="mqtt://h:1"), wait=0.2, out=out, link=Quiet())  # type: ignore[arg-type]
    assert code == 1 and "0 device(s) in fleet f" in out.getvalue()

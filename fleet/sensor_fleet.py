"""``fedge sim --source serial``: every agent reads its own simulated machine over a pty.

Each device gets a :class:`~fedge.firmware_bridge.simulator.Machine` of its own (its own
seed and wear rate) writing binary frames to a pseudo-terminal; the agent is the same one a
Raspberry Pi runs, reading that "serial port" into its SQLite store and training the
forecaster on windows of its own stream. The aggregator scores each global model on a
held-out stream from a machine no device sees, next to the predict-the-last-value baseline.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fedge.agent.config import AgentConfig, SerialConfig, TaskConfig
from fedge.agent.daemon import Agent
from fedge.agent.service import build_agent
from fedge.agent.tasks import forecast, last_value_baseline
from fedge.aggregator.config import AggregatorConfig
from fedge.aggregator.coordinator import Aggregator
from fedge.aggregator.service import build_aggregator
from fedge.aggregator.strategies.config import StrategyConfig
from fedge.firmware_bridge.binary_frames import encode_frame
from fedge.firmware_bridge.sample import Sample
from fedge.firmware_bridge.simulator import CHANNELS, Machine, open_pty, serve_pty
from fedge.protocol import TrainingConfig

from .signing_keys import write_signing_pair

WINDOW = 16
# Per-channel scaling shared by the fleet: vibration (g), temperature (C), current (A).
CENTER = (0.0, 0.0, 0.0, 40.0, 3.0)
SCALE = (0.1, 0.1, 0.1, 5.0, 0.2)
RATE_HZ = 500.0


def forecaster_model() -> Path:
    return Path(str(resources.files("fedge.models") / "artifacts" / "machine_forecaster.tflite"))


def held_out(path: Path, seed: int, n: int = 3000) -> float:
    """A stream no device sees, as forecast examples; returns the last-value baseline MSE."""
    machine = Machine(seed=seed, rate_hz=RATE_HZ, fault_rate=0.0)
    raw = np.array([s.values for s, _ in zip(machine.samples(), range(n), strict=False) if s])
    scaled = (raw - np.array(CENTER)) / np.array(SCALE)
    x, y = forecast(scaled.astype(np.float32), WINDOW)
    np.savez(path, x=x, y=y.astype(np.float32))
    return last_value_baseline(scaled.astype(np.float32), WINDOW)


@dataclass
class SerialFleet:
    """Agents fed over pseudo-terminals (the sensor and the maintenance sims): per device a
    pty, a thread writing binary frames into its master end at a rate until ``feed_stop``,
    and an agent reading the other end as its serial port."""

    feed_stop: threading.Event
    masters: list[int] = field(default_factory=list)
    feeders: list[threading.Thread] = field(default_factory=list)
    agents: list[Agent] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def add(self, folder: Path, samples: Iterable[Sample], rate_hz: float, **config: Any) -> None:
        """A device: ``config`` is its AgentConfig but for the serial port."""
        master, path = open_pty(folder / f"tty-{config['device_id']}")
        self.masters.append(master)
        feeder = threading.Thread(
            target=serve_pty,
            args=(master, samples, encode_frame),
            kwargs={"rate_hz": rate_hz, "stop": self.feed_stop},
            daemon=True,
        )
        self.feeders.append(feeder)
        self.agents.append(build_agent(AgentConfig(serial=SerialConfig(port=path), **config)))

    def feed(self) -> None:
        """Start the agents (each opens its port: its reader starts filling the store), then
        the feeders."""
        for agent in self.agents:
            agent.start()
        for feeder in self.feeders:
            feeder.start()

    def wait_stored(self, want: Sequence[int], timeout: float) -> int:
        """Until each agent's store holds ``want[i]`` samples (the readers hand them over in
        batches, up to about 0.6 s after they arrive) or ``timeout`` seconds: how many the
        stores hold in all."""

        def stored(agent: Agent) -> int:
            return int(agent.sensor.reader.counters["samples"] - agent.sensor.reader.held)

        until = time.monotonic() + timeout
        while time.monotonic() < until and any(
            stored(a) < w for a, w in zip(self.agents, want, strict=True)
        ):
            time.sleep(0.05)
        return sum(stored(a) for a in self.agents)

    def run(self, agg: Aggregator, stop: threading.Event, timeout: float) -> None:
        """Start ``agg`` and each agent's loop; drive ``agg`` until done or ``timeout`` s."""
        agg.start()
        for agent in self.agents:
            thread = threading.Thread(target=Agent.run, args=(agent, stop), daemon=True)
            thread.start()
            self.threads.append(thread)
        deadline = time.monotonic() + timeout
        while not agg.done and time.monotonic() < deadline:
            agg.step(0.1)

    def close(self, agg: Aggregator, stop: threading.Event) -> None:
        stop.set()
        self.feed_stop.set()
        for thread in self.threads + self.feeders:
            thread.join(10)
        for agent in self.agents:
            agent.stop()
        for master in self.masters:
            os.close(master)
        agg.link.close()
        agg.store.close()


def run_sensor_fleet(
    *,
    devices: int,
    rounds: int,
    broker: str,
    out: Path,
    seed: int = 0,
    epochs: int = 2,
    lr: float = 0.05,
    fleet: str = "sensors",
    round_timeout: float = 60.0,
    broker_for: Any = None,
    training: dict[str, Any] | None = None,
    strategy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    state = out / "state"
    state.mkdir(exist_ok=True)
    (out / "rounds.jsonl").unlink(missing_ok=True)
    baseline = held_out(out / "heldout.npz", seed=10_000 + seed)
    url = broker_for or (lambda client: broker)
    stop = threading.Event()
    serial = SerialFleet(stop)
    signing_key, public_key = write_signing_pair(state)
    task = TaskConfig(kind="forecast", window=WINDOW, center=CENTER, scale=SCALE, history=1500)
    for i in range(devices):
        machine = Machine(seed=seed * 100 + i, rate_hz=RATE_HZ, wear_per_hour=0.5 + i)
        serial.add(
            out,
            machine.samples(),
            RATE_HZ,
            device_id=f"dev{i:03d}",
            fleet=fleet,
            broker=url(f"{fleet}-dev{i:03d}"),
            model=forecaster_model(),
            task=task,
            state_dir=state,
            seed=seed * 1000 + i,
            aggregator_keys=(public_key,),
        )
    agents = serial.agents
    agg = build_aggregator(
        AggregatorConfig(
            fleet=fleet,
            broker=url(f"{fleet}-aggregator"),
            client_id=f"{fleet}-aggregator",
            signing_key=signing_key,
            model=forecaster_model(),
            state_dir=state,
            rounds=rounds,
            min_devices=devices,
            quorum=0.5,
            round_timeout=round_timeout,
            eval_data=out / "heldout.npz",
            training=TrainingConfig(epochs=epochs, batch_size=32, lr=lr, **(training or {})),
            # FedAvg: FedAdam's server step (0.05 per coordinate) overshoots this small
            # regression model (its loss rose 5x after round 1 in a 3-device trial).
            strategy=StrategyConfig(**({"name": "fedavg"} | (strategy or {}))),
            log=out / "rounds.jsonl",
            seed=seed,
        )
    )
    try:
        serial.feed()
        serial.wait_stored([WINDOW + 200] * len(agents), 30.0)  # a first round's examples
        serial.run(agg, stop, round_timeout * (rounds + 2))
    finally:
        serial.close(agg, stop)
    lines = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]
    done = [r for r in lines if r["status"] == "done" and r.get("participants")]
    summary = {
        "devices": devices,
        "rounds_completed": len([r for r in lines if r["status"] == "done"]),
        "channels": list(CHANNELS),
        "first_round_loss": done[0]["loss"] if done else None,
        "final_loss": done[-1]["loss"] if done else None,
        "last_value_baseline_loss": baseline,
        "samples_read": sum(a.sensor.reader.counters["samples"] for a in agents),
        "frame_faults": sum(sum(a.sensor.decoder.faults.values()) for a in agents),
        "frame_faults_by_kind": dict(sum((a.sensor.decoder.faults for a in agents), Counter())),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary

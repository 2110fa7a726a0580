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
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fedge.agent.config import AgentConfig, SerialConfig, TaskConfig
from fedge.agent.daemon import Agent
from fedge.agent.service import build_agent
from fedge.agent.tasks import forecast, last_value_baseline
from fedge.aggregator.config import AggregatorConfig
from fedge.aggregator.service import build_aggregator
from fedge.aggregator.strategies.config import StrategyConfig
from fedge.firmware_bridge.binary_frames import encode_frame
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
    feeders, masters, agents = [], [], []
    signing_key, public_key = write_signing_pair(state)
    task = TaskConfig(kind="forecast", window=WINDOW, center=CENTER, scale=SCALE, history=1500)
    for i in range(devices):
        master, path = open_pty(out / f"tty-dev{i:03d}")
        masters.append(master)
        machine = Machine(seed=seed * 100 + i, rate_hz=RATE_HZ, wear_per_hour=0.5 + i)
        feeder = threading.Thread(
            target=serve_pty,
            args=(master, machine.samples(), encode_frame),
            kwargs={"rate_hz": RATE_HZ, "stop": stop},
            daemon=True,
        )
        feeders.append(feeder)
        cfg = AgentConfig(
            device_id=f"dev{i:03d}",
            fleet=fleet,
            broker=url(f"{fleet}-dev{i:03d}"),
            model=forecaster_model(),
            serial=SerialConfig(port=path),
            task=task,
            state_dir=state,
            seed=seed * 1000 + i,
            aggregator_keys=(public_key,),
        )
        agents.append(build_agent(cfg))
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
    threads: list[threading.Thread] = []
    try:
        for agent in agents:
            agent.start()  # opens its port: the reader starts filling the store
        for feeder in feeders:
            feeder.start()
        # Enough samples for a first round's examples, in the stores (the readers hand them
        # over in batches, up to about 0.6 s after they arrive).
        want, until = WINDOW + 200, time.monotonic() + 30.0
        while time.monotonic() < until and any(
            a.sensor.reader.counters["samples"] - a.sensor.reader.held < want for a in agents
        ):
            time.sleep(0.05)
        agg.start()
        for agent in agents:
            t = threading.Thread(target=Agent.run, args=(agent, stop), daemon=True)
            t.start()
            threads.append(t)
        deadline = time.monotonic() + round_timeout * (rounds + 2)
        while not agg.done and time.monotonic() < deadline:
            agg.step(0.1)
    finally:
        stop.set()
        for t in threads + feeders:
            t.join(10)
        for agent in agents:
            agent.stop()
        for master in masters:
            os.close(master)
        agg.link.close()
        agg.store.close()
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

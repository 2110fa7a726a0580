"""``fedge sim``: an aggregator and N agents on one machine, over a real MQTT broker.

Each agent is the same :class:`fedge.agent.daemon.Agent` a device runs, built from
its own config, with its own MQTT client and its own data partition; only the
threads are shared. With no ``--broker`` an embedded amqtt broker is started.

Writes ``OUT/rounds.jsonl`` (one line per round, from the aggregator),
``OUT/summary.json``, and the partitions and configs it generated under ``OUT/``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from fedge.agent.config import AgentConfig
from fedge.agent.service import build_agent
from fedge.aggregator.config import AggregatorConfig, Training
from fedge.aggregator.service import build_aggregator

from .datasets import digits
from .embedded_broker import EmbeddedBroker
from .partition import partition

log = logging.getLogger("fedge.fleet")


@dataclass(frozen=True)
class SimOptions:
    devices: int = 10
    rounds: int = 20
    epochs: int = 5
    batch_size: int = 16
    lr: float = 0.1
    partition: str = "iid"
    seed: int = 0
    out: Path = Path("runs/sim")
    broker: str | None = None
    model: Path | None = None
    runtime: str = "litert"
    round_timeout: float = 60.0
    fleet: str = "sim"
    show_progress: bool = True


def bundled_model() -> Path:
    return Path(str(resources.files("fedge.models") / "artifacts" / "digits_mlp.tflite"))


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x=x, y=y)
    return path


def prepare(
    opts: SimOptions, embedded: EmbeddedBroker | None = None
) -> tuple[list[AgentConfig], AggregatorConfig]:
    """Data, partitions and configs under ``opts.out``: everything a run needs but a broker."""

    def broker_for(client_id: str) -> str:
        if embedded is not None:
            return embedded.url_for(client_id)
        return opts.broker or "mqtt://127.0.0.1:1883"

    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    data_dir = _fresh_dir(out / "data")
    state_dir = _fresh_dir(out / "state")
    (out / "rounds.jsonl").unlink(missing_ok=True)
    split = digits(opts.seed)
    rng = np.random.default_rng(opts.seed)
    parts = partition(opts.partition, split.y_train, opts.devices, rng)
    model = opts.model or bundled_model()
    test = _write_npz(data_dir / "test.npz", split.x_test, split.y_test)
    agents = []
    for i, idx in enumerate(parts):
        device = f"dev{i:03d}"
        path = _write_npz(data_dir / f"{device}.npz", split.x_train[idx], split.y_train[idx])
        agents.append(
            AgentConfig(
                device_id=device,
                fleet=opts.fleet,
                broker=broker_for(device),
                model=model,
                data=path,
                state_dir=state_dir,
                runtime=(opts.runtime,),
                seed=opts.seed * 1000 + i,
            )
        )
    agg = AggregatorConfig(
        fleet=opts.fleet,
        broker=broker_for(f"{opts.fleet}-aggregator"),
        client_id=f"{opts.fleet}-aggregator",
        model=model,
        state_dir=state_dir,
        rounds=opts.rounds,
        min_devices=opts.devices,
        quorum=0.5,
        round_timeout=opts.round_timeout,
        training=Training(epochs=opts.epochs, batch_size=opts.batch_size, lr=opts.lr),
        eval_data=test,
        log=out / "rounds.jsonl",
        seed=opts.seed,
    )
    return agents, agg


def run_sim(opts: SimOptions) -> dict:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    broker = None
    if opts.broker is None:
        broker = EmbeddedBroker().start()
    try:
        return _run(opts, broker)
    finally:
        if broker is not None:
            broker.stop()


def _run(opts: SimOptions, embedded: EmbeddedBroker | None) -> dict:
    from .progress import RoundDisplay

    agent_cfgs, agg_cfg = prepare(opts, embedded)
    display = RoundDisplay(opts.rounds, enabled=opts.show_progress)
    aggregator = build_aggregator(agg_cfg, on_round=display.round_done)
    agents = [build_agent(cfg) for cfg in agent_cfgs]
    stop = threading.Event()
    threads = []
    started = time.perf_counter()
    aggregator.start()
    for agent in agents:
        agent.start()
        t = threading.Thread(target=agent.run, args=(stop,), name=agent.device_id, daemon=True)
        t.start()
        threads.append(t)
    try:
        with display:
            deadline = time.monotonic() + opts.round_timeout * (opts.rounds + 2)
            while not aggregator.done and time.monotonic() < deadline:
                aggregator.step(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for agent in agents:
            agent.stop()
        aggregator.link.close()
        aggregator.store.close()
    return _summarise(opts, agg_cfg.log_path, agents, aggregator, time.perf_counter() - started)


def _summarise(
    opts: SimOptions, log_path: Path, agents: list, aggregator: object, elapsed: float
) -> dict:
    rounds = (
        [json.loads(line) for line in log_path.read_text().splitlines()]
        if log_path.exists()
        else []
    )
    done = [r for r in rounds if r["status"] == "done"]
    summary = {
        "devices": opts.devices,
        "rounds_requested": opts.rounds,
        "rounds_completed": len(done),
        "rounds_failed": len(rounds) - len(done),
        "final_accuracy": done[-1].get("accuracy") if done else None,
        "final_loss": done[-1].get("loss") if done else None,
        "best_accuracy": max((r.get("accuracy") or 0.0) for r in done) if done else None,
        "bytes_up": sum(a.link.bytes_up for a in agents),
        "bytes_down": sum(a.link.bytes_down for a in agents),
        "bytes_received_by_aggregator": sum(r["bytes_received"] for r in rounds),
        "epochs": opts.epochs,
        "batch_size": opts.batch_size,
        "lr": opts.lr,
        "partition": opts.partition,
        "seed": opts.seed,
        "runtime": opts.runtime,
        "wall_time_s": round(elapsed, 2),
    }
    (opts.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary

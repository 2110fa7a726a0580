"""A sharded run against a broker, and the same updates through one aggregator.

``sharded_run`` starts a coordinator with ``[shards]``, its workers and a few ``fedge agent``
daemons (digits, unequal IID shares) in threads of this process, against a real broker, while
an observer records every payload on ``update/+``. ``replay_single`` feeds those payloads,
round by round, to a single aggregator with the same config (no shards) on the in-memory
link. Sums are linear, so both must reach the same global model (bench/shards.py and
tests/integration/test_shards_mosquitto.py compare them).
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from fedge.agent.config import AgentConfig
from fedge.agent.service import build_agent
from fedge.aggregator.config import AggregatorConfig, ShardsConfig
from fedge.aggregator.coordinator import Aggregator
from fedge.aggregator.service import build_aggregator
from fedge.aggregator.shard_service import build_worker
from fedge.aggregator.store import Store
from fedge.aggregator.strategies.config import StrategyConfig
from fedge.models.runtime import load_runtime
from fedge.protocol import (
    GateSettings,
    Link,
    MemoryBroker,
    MemoryLink,
    SkipNotice,
    Status,
    Topics,
    TrainingConfig,
    UpdateHeader,
    decode,
    decode_skip,
    encode,
    is_skip,
    make_link,
)

from .datasets import digits
from .partition import iid


@dataclass
class ShardedRun:
    config: AggregatorConfig
    weights: dict[str, np.ndarray]  # the coordinator's global model at the end
    rounds: list[dict]  # its rounds.jsonl
    devices: list[str]
    updates: dict[int, list[tuple[str, bytes]]] = field(default_factory=dict)  # round -> sent
    accepted: dict[str, int] = field(default_factory=dict)  # worker -> answers it accepted


def digits_model() -> Path:
    return Path(str(resources.files("fedge.models") / "artifacts" / "digits_mlp.tflite"))


def sharded_run(
    broker: str,
    workdir: Path,
    *,
    fleet: str,
    workers: int,
    devices: int,
    rounds: int,
    seed: int = 0,
    timeout: float = 300.0,
) -> ShardedRun:
    """Run ``rounds`` rounds of ``devices`` agents with ``workers`` shard workers."""
    data = device_data(workdir, devices, seed)
    tag = fleet[-8:]
    cfg = sharded_config(
        broker,
        workdir,
        fleet=fleet,
        workers=[f"w{i}" for i in range(workers)],
        devices=devices,
        rounds=rounds,
        seed=seed,
    )
    topics = Topics(fleet)
    observer = make_link(broker, f"observer-{tag}")
    observer.connect()
    observer.subscribe(topics.updates)
    coordinator = build_aggregator(cfg)
    shard_workers = [build_worker(cfg, name) for name in cfg.shards.workers]  # type: ignore[union-attr]
    names = [f"d{i}-{tag}" for i in range(devices)]
    agents = [
        build_agent(
            AgentConfig(
                device_id=names[i],
                fleet=fleet,
                broker=broker,
                model=cfg.model,
                data=path,
                state_dir=workdir / "agents",
                seed=seed + i,
            )
        )
        for i, path in enumerate(data)
    ]
    run = serve_until_done(
        coordinator, shard_workers, agents, devices=names, rounds=rounds, timeout=timeout
    )
    collect_updates(observer, run)
    observer.close()
    return run


def serve_until_done(
    coordinator: Aggregator,
    workers: list,
    agents: list,
    *,
    devices: list[str],
    rounds: int,
    timeout: float,
) -> ShardedRun:
    """Start the workers, the coordinator and the agents, run until the coordinator has done
    its rounds (each worker and agent on a thread of its own), then stop them all."""
    stop = threading.Event()
    threads = []
    for w in workers:
        w.start()
        threads.append(threading.Thread(target=w.run, args=(stop,), daemon=True))
    coordinator.start()
    for a in agents:
        a.start()
        threads.append(threading.Thread(target=a.run, args=(stop,), daemon=True))
    for t in threads:
        t.start()
    end = time.monotonic() + timeout
    try:
        while not coordinator.done and time.monotonic() < end:
            coordinator.step(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for a in agents:
            a.stop()
        for w in workers:
            w.link.close()
            w.store.close()
        coordinator.link.close()
        coordinator.store.close()
    if not coordinator.done:
        raise RuntimeError(f"the run did not finish {rounds} round(s) in {timeout:g} s")
    cfg = coordinator.cfg
    return ShardedRun(
        config=cfg,
        weights=coordinator.weights,
        rounds=[json.loads(line) for line in cfg.log_path.read_text().splitlines()],
        devices=devices,
        accepted={w.name: w.accepted for w in workers},
    )


def device_data(workdir: Path, devices: int, seed: int) -> list[Path]:
    """Unequal IID shares of digits, one .npz a device (unequal: the weights matter)."""
    split = digits(seed)
    data = []
    for i, idx in enumerate(iid(split.y_train, devices, np.random.default_rng(seed))):
        keep = idx[: max(20, len(idx) * (devices - i) // devices)]
        path = workdir / f"dev{i}.npz"
        np.savez(path, x=split.x_train[keep], y=split.y_train[keep])
        data.append(path)
    return data


def sharded_config(
    broker: str,
    workdir: Path,
    *,
    fleet: str,
    workers: list[str],
    devices: int,
    rounds: int,
    seed: int,
) -> AggregatorConfig:
    """The coordinator's config: every device in every round, FedAdam."""
    return AggregatorConfig(
        fleet=fleet,
        broker=broker,
        client_id=f"agg-{fleet[-8:]}",
        model=digits_model(),
        state_dir=workdir / "agg",
        rounds=rounds,
        min_devices=devices,
        quorum=1.0,
        round_timeout=120,
        # float32 and no gate: every device uploads its exact delta every round.
        training=TrainingConfig(
            epochs=1, batch_size=16, lr=0.1, codec="float32", gate=GateSettings(threshold=0)
        ),
        strategy=StrategyConfig(name="fedadam"),
        seed=seed,
        shards=ShardsConfig(workers=workers),
    )


def collect_updates(observer: Link, run: ShardedRun) -> None:
    """What ``observer`` (subscribed to ``update/+``) saw, by round, into ``run.updates``."""
    topics = Topics(run.config.fleet)
    while (msg := observer.get(1.0)) is not None:
        header = (
            decode_skip(msg.payload, topics.device_of(msg.topic))
            if is_skip(msg.payload)
            else decode(msg.payload).msg
        )
        assert isinstance(header, (UpdateHeader, SkipNotice))
        run.updates.setdefault(header.round_id, []).append((msg.topic, msg.payload))


def replay_single(run: ShardedRun) -> tuple[dict[str, np.ndarray], list[dict]]:
    """The global model and rounds of one aggregator (no shards) given the same updates."""
    broker = MemoryBroker()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = run.config.model_copy(update={"shards": None, "state_dir": Path(tmp), "log": None})
        store = Store(Path(tmp) / "single.sqlite")
        agg = Aggregator(
            cfg,
            link=MemoryLink(broker, "single"),
            store=store,
            initial_weights=load_runtime(cfg.model).get_weights(),
        )
        agg.start()
        for device in run.devices:
            link = MemoryLink(broker, device)
            link.connect()
            status = Status(device_id=device, state="online", timestamp=time.time())
            link.publish(Topics(cfg.fleet).status(device), encode(status), retain=True)
        sender = MemoryLink(broker, "replay")
        sender.connect()
        try:
            for round_id in sorted(run.updates):
                _drain(agg)
                if agg.current is None or agg.current.round_id != round_id:
                    raise RuntimeError(f"the single aggregator is not at round {round_id}")
                for topic, payload in run.updates[round_id]:
                    sender.publish(topic, payload)
                _drain(agg)
            summaries = [json.loads(line) for line in cfg.log_path.read_text().splitlines()]
            return agg.weights, summaries
        finally:
            store.close()


def _drain(agg: Aggregator) -> None:
    while (msg := agg.link.get(0)) is not None:
        agg.handle(msg)
    agg.tick()

"""Rounds over a 3-node NATS cluster against rounds over one Mosquitto, same in-process fleet.

N agents (``build_agent``, one thread each) and one aggregator (``build_aggregator``) in this
process, on digits_mlp with IID digits partitions, every device in every round (float32
deltas, no gate). On ``nats`` the devices take turns between nodes 1 and 2 and the aggregator
uses node 3 (``tests/nats_cluster.py``, ``broker_config/nats-cluster.conf``), so every message
crosses a cluster route and sessions and retained messages are replicated JetStream streams; on
``mosquitto`` everyone uses one ``broker_config/dev.conf`` broker with persistence on. Runs
alternate between the two brokers, one seed each.

Printed per broker: the median and p90 round time (``duration_s`` in ``rounds.jsonl``,
announcement to new global model, local training included; round 1 left out) over the rounds
done in all runs, the rounds that failed at their deadline (``--round-timeout``; the
aggregator then announces the next), and the median time for the fleet to come up (every agent
connected and subscribed).

    .venv/bin/python bench/broker_cluster.py              # 10 devices, 11 rounds, 2 seeds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from fedge.agent.config import AgentConfig
from fedge.agent.service import build_agent
from fedge.aggregator.config import AggregatorConfig
from fedge.aggregator.service import build_aggregator
from fedge.aggregator.strategies.config import StrategyConfig
from fedge.fleet import mosquitto as local_broker
from fedge.fleet.datasets import digits
from fedge.fleet.partition import iid
from fedge.protocol import GateSettings, TrainingConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from nats_cluster import NatsCluster  # noqa: E402 (the tests' cluster helper, found above)

MODEL = ROOT / "models" / "artifacts" / "digits_mlp.tflite"


def partitions(work: Path, devices: int, seed: int) -> list[Path]:
    split = digits(seed)
    paths = []
    for i, idx in enumerate(iid(split.y_train, devices, np.random.default_rng(seed))):
        path = work / f"dev{i}.npz"
        np.savez(path, x=split.x_train[idx], y=split.y_train[idx])
        paths.append(path)
    return paths


def run_fleet(
    agent_urls: list[str], agg_url: str, args: argparse.Namespace, seed: int, work: Path
) -> tuple[list[float], int, float]:
    """Times (s) of the rounds done (round 1 left out), how many failed (a device's update or
    announcement missing at the deadline: the next round starts), and the time (s) the agents
    took to come up."""
    tag = f"bench-{seed}-{time.monotonic_ns() % 10**8}"
    cfg = AggregatorConfig(
        fleet=tag,
        broker=agg_url,
        client_id=f"agg-{tag}",
        model=MODEL,
        state_dir=work / "agg",
        rounds=args.rounds,
        min_devices=args.devices,
        quorum=1.0,
        round_timeout=args.round_timeout,
        training=TrainingConfig(
            epochs=1,
            batch_size=args.batch_size,
            lr=0.1,
            codec="float32",
            gate=GateSettings(threshold=0),
        ),
        strategy=StrategyConfig(name="fedavg"),
    )
    agg = build_aggregator(cfg)
    agents = [
        build_agent(
            AgentConfig(
                device_id=f"d{i}-{tag}",
                fleet=tag,
                broker=agent_urls[i % len(agent_urls)],
                model=MODEL,
                data=path,
                state_dir=work / "agents",
                seed=seed * 1000 + i,
            )
        )
        for i, path in enumerate(partitions(work, args.devices, seed))
    ]
    stop = threading.Event()
    threads = []
    started = []
    try:
        agg.start()
        t0 = time.perf_counter()
        for a in agents:
            a.start()
            started.append(a)
        up = time.perf_counter() - t0
        for a in agents:
            threads.append(threading.Thread(target=a.run, args=(stop,), daemon=True))
            threads[-1].start()
        agg.run(stop)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for a in started:
            a.stop()
        agg.link.close()
        agg.store.close()
    rounds = [json.loads(line) for line in cfg.log_path.read_text().splitlines()]
    done = [r["duration_s"] for r in rounds if r["status"] == "done" and r["round"] > 1]
    return done, len(rounds) - len(done) - 1, up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--round-timeout", type=float, default=60.0)
    args = ap.parse_args()
    print(
        f"{args.devices} in-process agents, {args.rounds} rounds (round 1 left out),"
        f" 1 epoch, batch {args.batch_size}, {args.seeds} seeds"
    )
    times: dict[str, list[float]] = {"mosquitto": [], "nats": []}
    failed = {"mosquitto": 0, "nats": 0}
    ups: dict[str, list[float]] = {"mosquitto": [], "nats": []}
    with tempfile.TemporaryDirectory(prefix="fedge-brokers-") as tmp:
        for seed in range(args.seeds):
            for broker in times:
                work = Path(tmp) / f"{broker}-{seed}"
                work.mkdir()
                if broker == "mosquitto":
                    with local_broker.LocalMosquitto(work / "broker") as mosq:
                        got, lost, up = run_fleet([mosq.url], mosq.url, args, seed, work)
                else:
                    with NatsCluster(3, workdir=work / "broker") as cluster:
                        n1, n2, n3 = cluster.nodes
                        got, lost, up = run_fleet([n1.url, n2.url], n3.url, args, seed, work)
                times[broker] += got
                failed[broker] += lost
                ups[broker].append(up)
    print(
        f"{'broker':<26} {'median ms':>10} {'p90 ms':>8} {'rounds':>7} {'failed':>7}"
        f" {'fleet up s':>11}"
    )
    labels = {"mosquitto": "Mosquitto, 1 node", "nats": "NATS, 3 nodes (JetStream)"}
    for broker, label in labels.items():
        ms = sorted(1000 * t for t in times[broker])
        p90 = ms[int(0.9 * (len(ms) - 1))]
        up = statistics.median(ups[broker])
        print(
            f"{label:<26} {statistics.median(ms):>10.1f} {p90:>8.1f} {len(ms):>7}"
            f" {failed[broker]:>7} {up:>11.2f}"
        )


if __name__ == "__main__":
    main()

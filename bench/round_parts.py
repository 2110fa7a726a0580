"""Where a round's CPU goes inside the agent and the aggregator, part by part.

The configs ``fedge fleet launch`` writes (10 devices, digits_mlp, 1 epoch of batch 64, signed
rounds), built into one process with ``build_agent`` / ``build_aggregator`` over the in-memory
link: no MQTT, no other processes, so what is left is the two programs' own work. Chosen
methods are wrapped to add up the main thread's CPU time (``time.thread_time``) spent in them;
rounds 1-3 are left out. A part's time includes the parts it calls (``handle`` includes all).

    .venv/bin/python bench/round_parts.py            # 30 rounds
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedge.agent import daemon, outbox
from fedge.agent.config import AgentConfig
from fedge.agent.daemon import Agent
from fedge.agent.service import build_agent
from fedge.aggregator import coordinator, intake, store
from fedge.aggregator.config import AggregatorConfig
from fedge.aggregator.service import build_aggregator
from fedge.fleet.launch import AGGREGATOR, LaunchOptions, RunFolder, write_run
from fedge.protocol import MemoryBroker, MemoryLink

from fedge.configfile import load_config

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "artifacts" / "digits_mlp.tflite"
SKIP = 3  # rounds left out (start-up)

spent: collections.Counter[str] = collections.Counter()


def timed(owner: Any, name: str, label: str) -> None:
    """Add the main thread's CPU time in ``owner.name`` to ``spent[label]``."""
    inner: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[label] += time.thread_time() - start

    setattr(owner, name, wrapper)


AGENT_PARTS = [
    (Agent, "handle", "handle (all of it)"),
    (daemon, "verify", "signature checks"),
    (daemon, "decode", "envelope decode"),
    (Agent, "_on_global", "model applied"),
    (daemon, "train_local", "local training"),
    (daemon.evaluation, "score", "scoring the global model"),
    (daemon.steps, "encode", "update encode"),
    (outbox.Outbox, "put", "outbox (write, fsync, rename)"),
    (Agent, "_save", "state save (write, fsync, rename)"),
    (Agent, "_status", "statuses"),
]
AGGREGATOR_PARTS = [
    (coordinator.Aggregator, "handle", "handle (all messages)"),
    (intake, "parse", "update envelope parse"),
    (intake, "decode", "update decode (codec)"),
    (store.Store, "record_answer", "answer kept (SQLite)"),
    (coordinator.Aggregator, "_on_status", "statuses"),
    (coordinator.Aggregator, "tick", "tick (all of it)"),
    (coordinator.Aggregator, "_finish", "the close"),
    (coordinator.Aggregator, "_publish_global", "global model signed and sent"),
    (coordinator.Aggregator, "_announce", "next round announced"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--devices", type=int, default=10)
    args = ap.parse_args()
    for owner, name, label in AGENT_PARTS:
        timed(owner, name, "agent: " + label)
    for owner, name, label in AGGREGATOR_PARTS:
        timed(owner, name, "aggregator: " + label)
    with tempfile.TemporaryDirectory(prefix="fedge-parts-") as tmp:
        opts = LaunchOptions(
            devices=args.devices,
            rounds=args.rounds,
            seed=0,
            out=Path(tmp),
            broker="mqtt://127.0.0.1:1",  # written into the configs, never dialled
            model=MODEL,
            epochs=1,
            batch_size=64,
            show_progress=False,
        )
        run = RunFolder(Path(tmp)).fresh()
        devices = write_run(opts, run, opts.broker or "", "parts")
        broker = MemoryBroker()
        agg_cfg = load_config(run.config(AGGREGATOR), AggregatorConfig)
        agg = build_aggregator(agg_cfg, link=MemoryLink(broker, "aggregator"))
        agents = [
            build_agent(
                load_config(run.config(d), AgentConfig),
                link=MemoryLink(broker, d, will=Agent.will(d, "parts")),
            )
            for d in devices
        ]
        agg.start()
        for agent in agents:
            agent.start()
        totals = {"agent": 0.0, "aggregator": 0.0}
        mark: tuple[dict[str, float], collections.Counter[str]] | None = None
        while not agg.done:
            busy = False
            for agent in agents:
                start = time.thread_time()
                while agent.step(0):
                    busy = True
                totals["agent"] += time.thread_time() - start
            start = time.thread_time()
            while (msg := agg.link.get(0)) is not None:
                agg.handle(msg)
                agg.link.ack(msg)
                busy = True
            agg.tick()
            totals["aggregator"] += time.thread_time() - start
            if mark is None and agg.completed == SKIP:
                mark = (dict(totals), collections.Counter(spent))
            if not busy:
                time.sleep(0.001)
        assert mark is not None
        rounds = agg.completed - SKIP
        for agent in agents:
            agent.link.close()
        agg.link.close()
        agg.store.close()
    before, spent_before = mark
    print(f"{args.devices} agents and an aggregator, one process, in-memory link, {rounds} rounds")
    print("main-thread CPU, ms per round (agent: per agent)")
    per_agent = 1000 * (totals["agent"] - before["agent"]) / rounds / args.devices
    print(f"{'agent: everything':<44} {per_agent:>7.3f}")
    for _, _, label in AGENT_PARTS:
        key = "agent: " + label
        print(f"{key:<44} {1000 * (spent[key] - spent_before[key]) / rounds / args.devices:>7.3f}")
    whole = 1000 * (totals["aggregator"] - before["aggregator"]) / rounds
    print(f"{'aggregator: everything':<44} {whole:>7.3f}")
    for _, _, label in AGGREGATOR_PARTS:
        key = "aggregator: " + label
        print(f"{key:<44} {1000 * (spent[key] - spent_before[key]) / rounds:>7.3f}")


if __name__ == "__main__":
    main()

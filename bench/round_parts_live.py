"""Where a round's CPU goes in real processes, part by part (``round_parts.py`` with MQTT).

The launch of ``bench/round_cpu.py`` (N ``fedge agent`` processes and a ``fedge aggregator``
on a Mosquitto of the bench's own, digits_mlp, signed rounds, TCP_NODELAY), with chosen
methods of each process wrapped to add up its main thread's CPU time (``time.thread_time``)
spent in them. Parts are noted at each round announcement, like the process's CPU, and
reported per round between round ``--first`` and the last: start-up and exit left out. A
part includes the parts it calls; "link get" is the queue or socket work of taking a message,
not the wait. Agent parts are the mean over the agent processes.

    .venv/bin/python bench/round_parts_live.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from fedge.fleet import mosquitto as local_broker
from fedge.fleet.launch import LaunchOptions, launch

MODEL = Path(__file__).resolve().parent.parent / "models" / "artifacts" / "digits_mlp.tflite"

WRAPPER = r"""
import atexit, collections, json, os, resource, sys, time
marks = []
spent = collections.Counter()
def timed(owner, name, label):
    inner = getattr(owner, name)
    def wrapper(*args, **kwargs):
        start = time.thread_time()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[label] += time.thread_time() - start
    setattr(owner, name, wrapper)
def cpu():
    whole = resource.getrusage(resource.RUSAGE_SELF)
    main = resource.getrusage(resource.RUSAGE_THREAD)
    return [whole.ru_utime + whole.ru_stime, main.ru_utime + main.ru_stime, dict(spent)]
def write():
    out = os.path.join(os.environ["FEDGE_BENCH_CPU"], f"{sys.argv[1]}-{os.getpid()}.json")
    with open(out, "w") as fh:
        json.dump({"role": sys.argv[1], "marks": marks}, fh)
atexit.register(write)
import logging
from fedge.protocol.paho_link import PahoLink
link_parts = [
    (PahoLink, "get", "link get"),
    (PahoLink, "publish", "link publish"),
    (logging.Logger, "_log", "log lines"),
]
if sys.argv[1] == "agent":
    from fedge.agent import daemon, outbox
    from fedge.agent.daemon import Agent
    for owner, name, label in [
        (Agent, "handle", "handle (all of it)"),
        (daemon, "verify", "signature checks"),
        (daemon, "decode", "envelope decode"),
        (Agent, "_on_global", "model applied"),
        (daemon, "train_local", "local training"),
        (daemon.evaluation, "score", "scoring the global model"),
        (daemon.steps, "encode", "update encode"),
        (outbox.Outbox, "put", "outbox written"),
        (Agent, "_save", "state file saved"),
        (Agent, "_status", "statuses"),
        *link_parts,
    ]:
        timed(owner, name, label)
    taken = Agent._on_round_announced
    def noted(self, ann):
        if ann.round_id > self.state.round_seen:
            marks.append([ann.round_id, *cpu()])
        return taken(self, ann)
    Agent._on_round_announced = noted
else:
    from fedge.aggregator import coordinator, intake, store
    from fedge.aggregator.coordinator import Aggregator
    for owner, name, label in [
        (Aggregator, "handle", "handle (all messages)"),
        (intake, "parse", "update envelope parse"),
        (intake, "decode", "update decode (codec)"),
        (store.Store, "record_answer", "answer kept (SQLite)"),
        (coordinator, "decode_status", "status decode"),
        (Aggregator, "tick", "tick (all of it)"),
        (Aggregator, "_finish", "the close"),
        (Aggregator, "_publish_global", "global model signed and sent"),
        (PahoLink, "ack", "link ack"),
        *link_parts,
    ]:
        timed(owner, name, label)
    announce = Aggregator._announce
    def noted(self, now):
        marks.append([self.next_round_id, *cpu()])
        return announce(self, now)
    Aggregator._announce = noted
from fedge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def wrapped_command(role: str, config: Path) -> list[str]:
    return [sys.executable, "-c", WRAPPER, role, "--config", str(config)]


def per_round(marks: list, first: int, last: int) -> dict[str, float]:
    """ms per round between the announcements of ``first`` and ``last``."""
    at = {int(m[0]): m[1:] for m in marks}
    n = last - first
    out = {"process": 1000 * (at[last][0] - at[first][0]) / n}
    out["main thread"] = 1000 * (at[last][1] - at[first][1]) / n
    for label, value in at[last][2].items():
        out[label] = 1000 * (value - at[first][2].get(label, 0.0)) / n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=26)
    ap.add_argument("--first", type=int, default=4, help="CPU counted from this round")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedge-parts-live-") as tmp:
        work = Path(tmp)
        notes = work / "cpu"
        notes.mkdir()
        os.environ["FEDGE_BENCH_CPU"] = str(notes)
        with local_broker.LocalMosquitto(work / "broker") as broker:
            opts = LaunchOptions(
                devices=args.devices,
                rounds=args.rounds,
                seed=0,
                out=work / "run",
                broker=broker.url,
                model=MODEL,
                epochs=1,
                batch_size=64,
                show_progress=False,
            )
            launch(opts, command=wrapped_command, echo=lambda _: None)
        agents: list[dict[str, float]] = []
        aggregator: dict[str, float] = {}
        for path in notes.iterdir():
            note = json.loads(path.read_text())
            parts = per_round(note["marks"], args.first, args.rounds)
            if note["role"] == "agent":
                agents.append(parts)
            else:
                aggregator = parts
    print(
        f"{args.devices} agent processes, {args.rounds} rounds, digits_mlp; main-thread CPU,"
        f" ms per round from round {args.first} (agent: mean per agent process);"
        f" load average {os.getloadavg()[0]:.1f}"
    )
    for label in agents[0]:
        value = statistics.mean(a.get(label, 0.0) for a in agents)
        print(f"{'agent: ' + label:<44} {value:>7.3f}")
    for label, value in aggregator.items():
        print(f"{'aggregator: ' + label:<44} {value:>7.3f}")


if __name__ == "__main__":
    main()

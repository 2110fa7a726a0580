"""Where a round's CPU goes with real processes: each agent process, the aggregator, Mosquitto.

``fedge fleet launch`` runs N ``fedge agent`` processes and a ``fedge aggregator`` (signed
rounds, TCP_NODELAY, the small model: 1 epoch of batch 64) on a Mosquitto of the bench's own,
as ``bench/round_latency.py`` does. Each child runs the fedge command under a small wrapper
that notes the process's CPU time (``getrusage``: all its threads, and its main thread alone)
when a round is announced: the aggregator as it announces one, an agent as it takes the
announcement. CPU per round is the difference between round ``--first`` and the last round,
divided by the rounds between: start-up and exit are left out, and other load on the machine
changes it far less than it changes the round times. Mosquitto's share is its whole run's CPU
over the rounds. The round time is ``duration_s`` in ``rounds.jsonl`` (announcement to new
global model), round 1 left out.

    .venv/bin/python bench/round_cpu.py                    # 3 launches of 26 rounds
    .venv/bin/python bench/round_cpu.py --launches 5 --rounds 41
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

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "artifacts" / "digits_mlp.tflite"
# The children: the fedge command, with the process's CPU noted at every round announcement
# and written to $FEDGE_BENCH_CPU/<role>-<pid>.json at exit.
WRAPPER = r"""
import atexit, json, os, resource, sys
marks = []
def cpu():
    whole = resource.getrusage(resource.RUSAGE_SELF)
    main = resource.getrusage(resource.RUSAGE_THREAD)
    return [whole.ru_utime + whole.ru_stime, main.ru_utime + main.ru_stime]
def write():
    out = os.path.join(os.environ["FEDGE_BENCH_CPU"], f"{sys.argv[1]}-{os.getpid()}.json")
    with open(out, "w") as fh:
        json.dump({"role": sys.argv[1], "marks": marks}, fh)
atexit.register(write)
if sys.argv[1] == "agent":
    from fedge.agent.daemon import Agent
    taken = Agent._on_round_announced
    def noted(self, ann):
        if ann.round_id > self.state.round_seen:
            marks.append([ann.round_id, *cpu()])
        return taken(self, ann)
    Agent._on_round_announced = noted
else:
    from fedge.aggregator.coordinator import Aggregator
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


def process_cpu(pid: int) -> float:
    """Seconds of CPU (user + system) of a running process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def per_round(marks: list[list[float]], first: int, last: int) -> tuple[float, float]:
    """ms of CPU per round between the announcements of ``first`` and ``last``: the whole
    process, and its main thread."""
    at = {int(m[0]): m[1:] for m in marks}
    n = last - first
    return tuple(1000 * (at[last][i] - at[first][i]) / n for i in range(2))  # type: ignore[return-value]


def run_one(args: argparse.Namespace, work: Path) -> dict:
    notes = work / "cpu"
    notes.mkdir()
    os.environ["FEDGE_BENCH_CPU"] = str(notes)
    broker = local_broker.LocalMosquitto(work / "broker")
    out = work / "run"
    with broker:
        opts = LaunchOptions(
            devices=args.devices,
            rounds=args.rounds,
            seed=args.seed,
            out=out,
            broker=broker.url,
            model=MODEL,
            epochs=1,
            batch_size=args.batch_size,
            show_progress=False,
        )
        launch(opts, command=wrapped_command, echo=lambda _: None)
        mosquitto = process_cpu(broker._process.pid)  # type: ignore[union-attr]
    rounds = [json.loads(line) for line in (out / "state" / "aggregator" / "rounds.jsonl").open()]
    times = sorted(
        1000 * r["duration_s"] for r in rounds if r["status"] == "done" and r["round"] > 1
    )
    agents, aggregator = [], (0.0, 0.0)
    for path in notes.iterdir():
        note = json.loads(path.read_text())
        cpu = per_round(note["marks"], args.first, args.rounds)
        if note["role"] == "agent":
            agents.append(cpu)
        else:
            aggregator = cpu
    agent = statistics.mean(a[0] for a in agents)
    result = {
        "median_ms": statistics.median(times),
        "p90_ms": times[int(0.9 * (len(times) - 1))],
        "agent_ms": agent,
        "agent_main_ms": statistics.mean(a[1] for a in agents),
        "aggregator_ms": aggregator[0],
        "mosquitto_ms": 1000 * mosquitto / args.rounds,
        "load": os.getloadavg()[0],
    }
    result["total_ms"] = args.devices * agent + aggregator[0] + result["mosquitto_ms"]
    return result


COLUMNS = [
    ("median_ms", "median round"),
    ("p90_ms", "p90"),
    ("agent_ms", "agent CPU"),
    ("agent_main_ms", "(main thread)"),
    ("aggregator_ms", "aggregator CPU"),
    ("mosquitto_ms", "Mosquitto CPU"),
    ("total_ms", "all CPU"),
    ("load", "load avg"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=26)
    ap.add_argument("--first", type=int, default=4, help="CPU counted from this round")
    ap.add_argument("--launches", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not 1 < args.first < args.rounds:
        ap.error("--first must lie between 1 and --rounds")
    print(
        f"{args.devices} agent processes, {args.rounds} rounds, digits_mlp, 1 epoch,"
        f" batch {args.batch_size}; ms per round (CPU from round {args.first})"
    )
    print("  ".join(f"{title:>14}" for _, title in COLUMNS))
    results = []
    for i in range(args.launches):
        with tempfile.TemporaryDirectory(prefix=f"fedge-cpu-{i}-") as tmp:
            results.append(run_one(args, Path(tmp)))
        print("  ".join(f"{results[-1][key]:>14.1f}" for key, _ in COLUMNS), flush=True)
    medians = {key: statistics.median(r[key] for r in results) for key, _ in COLUMNS}
    print("  ".join(f"{medians[key]:>14.1f}" for key, _ in COLUMNS), " (medians)")


if __name__ == "__main__":
    main()

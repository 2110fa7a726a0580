"""How long a round takes with real processes on loopback, with and without Nagle's algorithm.

``fedge fleet launch`` runs N ``fedge agent`` processes and a ``fedge aggregator`` on a Mosquitto
of the bench's own. Each configuration runs twice, side by side in one run:

- ``nodelay``: as shipped: TCP_NODELAY on every fedge MQTT socket (``fedge.protocol.paho_link``)
  and ``set_tcp_nodelay true`` in the broker config;
- ``nagle``: both switched off, as paho and Mosquitto behave by default: the children run with
  the link's TCP_NODELAY hook replaced by a no-op, and the broker config says false.

A round's time is ``duration_s`` in ``rounds.jsonl`` (from the announcement to the new global
model), so it includes the devices' local training; one epoch of a few batches keeps that
small. Round 1 waits for the agents to start and is left out of the medians.

    .venv/bin/python bench/round_latency.py            # digits_mlp and the 50k model
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from fedge.fleet import mosquitto as local_broker
from fedge.fleet.launch import LaunchOptions, launch

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "digits_mlp (4.8k)": ROOT / "models" / "artifacts" / "digits_mlp.tflite",
    "digits_mlp_50k (50k)": ROOT / "models" / "artifacts" / "digits_mlp_50k.tflite",
}
# The children of the ``nagle`` runs: the fedge command with the link's hook made a no-op.
NAGLE = (
    "import sys, fedge.protocol.paho_link as link; link._no_delay = lambda *a: None;"
    " from fedge.cli import main; sys.exit(main(sys.argv[1:]))"
)


def nagle_command(role: str, config: Path) -> list[str]:
    return [sys.executable, "-c", NAGLE, role, "--config", str(config)]


def run_one(model: Path, nodelay: bool, args: argparse.Namespace, work: Path) -> list[float]:
    """Round times (s) of one launch, round 1 left out."""
    conf = work / f"broker-{nodelay}.conf"
    shipped = local_broker.dev_config().read_text()
    conf.write_text(
        shipped.replace("set_tcp_nodelay true", f"set_tcp_nodelay {str(nodelay).lower()}")
    )
    broker = local_broker.LocalMosquitto(work / f"broker-{nodelay}")
    broker.config = conf
    out = work / f"run-{model.stem}-{nodelay}"
    with broker:
        opts = LaunchOptions(
            devices=args.devices,
            rounds=args.rounds,
            seed=args.seed,
            out=out,
            broker=broker.url,
            model=model,
            epochs=1,
            batch_size=args.batch_size,
            show_progress=False,
        )
        launch(opts, **({} if nodelay else {"command": nagle_command}), echo=lambda _: None)
    rounds = [json.loads(line) for line in (out / "state" / "aggregator" / "rounds.jsonl").open()]
    return [r["duration_s"] for r in rounds if r["status"] == "done" and r["round"] > 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"{args.devices} agent processes, {args.rounds} rounds, 1 epoch, batch {args.batch_size}")
    print(f"{'model':<22} {'sockets':<8} {'median ms':>10} {'p90 ms':>8} {'rounds':>7}")
    medians: dict[tuple[str, bool], float] = {}
    with tempfile.TemporaryDirectory(prefix="fedge-latency-") as tmp:
        for name, model in MODELS.items():
            for nodelay in (True, False):  # side by side, per model
                times = run_one(model, nodelay, args, Path(tmp))
                ms = sorted(1000 * t for t in times)
                medians[name, nodelay] = statistics.median(ms)
                p90 = ms[int(0.9 * (len(ms) - 1))]
                label = "nodelay" if nodelay else "nagle"
                median = medians[name, nodelay]
                print(f"{name:<22} {label:<8} {median:>10.1f} {p90:>8.1f} {len(ms):>7}")
    for name in MODELS:
        ratio = medians[name, False] / medians[name, True]
        print(f"{name}: Nagle's algorithm makes the median round {ratio:.1f}x longer")


if __name__ == "__main__":
    main()

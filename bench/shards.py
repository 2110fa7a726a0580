"""Aggregator shards: a sharded run against Mosquitto equals the single aggregator.

For 2, 3 and 4 workers and a few seeds: a coordinator with ``[shards]``, its workers (MQTT
shared subscription on ``update/+``) and N ``fedge agent`` daemons (digits, FedAdam, float32
uploads) run R rounds against a local Mosquitto, in threads of this process; an observer
records every update. The same updates then go, round by round, through one aggregator
without shards (``fedge.fleet.shardrun.replay_single``). Printed: the largest absolute
difference between the two global models at the end, and how the broker spread the updates.

    .venv/bin/python bench/shards.py                  # 8 devices, 3 rounds, seeds 0-2
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

import numpy as np
from fedge.fleet.mosquitto import LocalMosquitto
from fedge.fleet.shardrun import replay_single, sharded_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 3, 4])
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(f"{args.devices} agents, {args.rounds} rounds, seeds 0-{args.seeds - 1}, fedadam")
    print("workers  max |sharded - single|  updates per worker (seed 0)  round s (median)")
    with tempfile.TemporaryDirectory() as tmp, LocalMosquitto(Path(tmp) / "broker") as broker:
        for workers in args.workers:
            diffs, spread, times = [], "", []
            for seed in range(args.seeds):
                work = Path(tmp) / f"w{workers}-s{seed}"
                work.mkdir()
                run = sharded_run(
                    broker.url,
                    work,
                    fleet=f"bench-shards-{workers}-{seed}",
                    workers=workers,
                    devices=args.devices,
                    rounds=args.rounds,
                    seed=seed,
                )
                single, replayed = replay_single(run)
                if [r["weights"] for r in replayed] != [r["weights"] for r in run.rounds]:
                    raise SystemExit(f"seed {seed}: the replay's rounds differ from the run's")
                diffs.append(
                    max(float(np.max(np.abs(run.weights[k] - w))) for k, w in single.items())
                )
                times += [r["duration_s"] for r in run.rounds]
                if seed == 0:
                    spread = " ".join(str(n) for n in run.accepted.values())
            print(
                f"{workers:>7}  {max(diffs):>21.3g}  {spread:>27}"
                f"  {statistics.median(times):>16.2f}"
            )


if __name__ == "__main__":
    main()

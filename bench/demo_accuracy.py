"""Accuracy of the federated demo setting against centralised training of the same model.

Runs ``fedge sim`` (10 devices, IID, 20 rounds, E=5 by default) for several seeds on the
embedded broker, and for each seed trains the same model centrally on the union of the
partitions for as many passes over the data as a device makes (E per round), with the same
batch size and learning rate. Prints one row per seed, then medians.

    .venv/bin/python bench/demo_accuracy.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from fedge.agent.dataset import Dataset
from fedge.agent.trainer import train_local
from fedge.fleet.datasets import digits
from fedge.fleet.sim import SimOptions, bundled_model, run_sim
from fedge.models.runtime import load_runtime


def centralised(seed: int, passes: int, batch_size: int, lr: float) -> float:
    split = digits(seed)
    rt = load_runtime(bundled_model(), prefer=("litert",))
    train_local(
        rt,
        Dataset(split.x_train, split.y_train),
        epochs=passes,
        batch_size=batch_size,
        lr=lr,
        rng=np.random.default_rng(seed),
    )
    return rt.evaluate(split.x_test, split.y_test)[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--out", default="runs/bench-demo")
    args = p.parse_args()
    rows = []
    print(
        f"{'seed':>4} {'federated':>9} {'best':>6} {'first>=94%':>10} "
        f"{'centralised':>11} {'sim s':>6}"
    )
    for seed in args.seeds:
        out = Path(args.out) / f"seed{seed}"
        t0 = time.perf_counter()
        summary = run_sim(
            SimOptions(
                devices=args.devices,
                rounds=args.rounds,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=seed,
                out=out,
                show_progress=False,
            )
        )
        elapsed = time.perf_counter() - t0
        rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
        first = next((r["round"] for r in rounds if r.get("accuracy", 0) >= 0.94), None)
        central = centralised(seed, args.epochs * args.rounds, args.batch_size, args.lr)
        rows.append((summary["final_accuracy"], central))
        print(
            f"{seed:>4} {summary['final_accuracy']:>9.2%} {summary['best_accuracy']:>6.2%} "
            f"{first if first else '-':>10} {central:>11.2%} {elapsed:>6.1f}"
        )
    fed = statistics.median(r[0] for r in rows)
    cen = statistics.median(r[1] for r in rows)
    print(f"median federated {fed:.2%}, centralised {cen:.2%}, gap {100 * (cen - fed):.2f} points")


if __name__ == "__main__":
    main()

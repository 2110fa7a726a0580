"""Accuracy against epsilon: central DP-FedAvg on digits with hundreds of simulated devices.

Runs ``fedge sim`` (the real agents and aggregator over the embedded broker, devices on the
hub client) for each fleet size, once without differential privacy and once per noise
multiplier ``z`` with central DP (adaptive clip toward the median update norm, epsilon by
dp-accounting's RDP accountant at delta 1e-5), and prints one row per run: epsilon after the
last round, the held-out accuracy of the final model and the mean of the last five rounds,
and the gap to the fleet's non-private run (last five rounds). It never fails on a number.

The parameters that matter (docs/privacy.md, Choosing z and C): the devices per round ``m``
and the fleet ``N`` (epsilon depends on the rate q = selected / online, the noise in the mean
on z / selected: more devices at the same rate buy accuracy for free), the rounds (epsilon
grows with them), ``z``, and the codec (float32 here: under central DP the aggregator's noise
is dense, and a dense update carries more signal per round than top-k).

    .venv/bin/python bench/privacy_accuracy.py                       # about 10 minutes
    .venv/bin/python bench/privacy_accuracy.py --fleets 100:20 --z 1.3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from fedge.fleet.sim import SimOptions, run_sim
from machine import machine_line  # bench/machine.py


def one_run(args: argparse.Namespace, devices: int, per_round: int, z: float | None) -> dict:
    name = f"n{devices}-m{per_round}-" + ("nodp" if z is None else f"z{z:g}")
    out = Path(args.out) / name
    t0 = time.perf_counter()
    summary = run_sim(
        SimOptions(
            devices=devices,
            devices_per_round=per_round,
            rounds=args.rounds,
            epochs=args.epochs,
            lr=args.lr,
            codec=args.codec,
            strategy=args.strategy,
            seed=args.seed,
            out=out,
            baselines=False,
            show_progress=False,
            dp=None if z is None else "central",
            noise_multiplier=1.0 if z is None else z,
            clip=args.clip,
            adaptive_clip_quantile=args.quantile,
            target_delta=args.delta,
        )
    )
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    dp: dict[str, Any] = summary.get("privacy", {})
    rates = [r["privacy"]["sampling_rate"] for r in rounds if "privacy" in r]
    return {
        "devices": devices,
        "per_round": per_round,
        "z": z,
        "q": rates[-1] if rates else None,
        "rounds": summary["rounds_completed"],
        "epsilon": dp.get("epsilon"),
        "final": summary["final_accuracy"],
        "last5": summary["last5_accuracy"],
        "clip": dp.get("final_clip"),
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--fleets",
        nargs="+",
        default=["200:40", "100:20"],
        metavar="N:M",
        help="devices : devices per round (the round selects M x 1.3, closes at M)",
    )
    p.add_argument("--z", type=float, nargs="+", default=[0.8, 1.3, 2.0], help="noise multipliers")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--codec", default="float32")
    p.add_argument("--strategy", default="fedavg")
    p.add_argument("--clip", type=float, default=0.5, help="initial clip C")
    p.add_argument("--quantile", type=float, default=0.5, help="adaptive clip target")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-privacy")
    args = p.parse_args()
    print(machine_line())
    print(
        f"digits, IID, {args.rounds} rounds, E={args.epochs}, lr {args.lr}, codec {args.codec},"
        f" {args.strategy}; central DP, adaptive clip (quantile {args.quantile:g}, initial"
        f" {args.clip:g}); epsilon at delta {args.delta:g} (RDP)"
    )
    head = (
        f"{'devices':>7} {'m':>3} {'z':>4} {'q':>5} {'epsilon':>7} {'final':>6} "
        f"{'last5':>6} {'gap':>6} {'clip':>5} {'s':>5}"
    )
    print(head)
    for fleet in args.fleets:
        devices, per_round = (int(x) for x in fleet.split(":"))
        base = None
        for z in [None, *args.z]:
            row = one_run(args, devices, per_round, z)
            if z is None:
                base = row["last5"]
            gap = None if base is None or z is None else 100 * (base - row["last5"])
            print(
                f"{devices:>7} {per_round:>3} {_fmt(z, 'g'):>4} {_fmt(row['q'], '.2f'):>5}"
                f" {_fmt(row['epsilon'], '.2f'):>7} {row['final']:>6.1%} {row['last5']:>6.1%}"
                f" {_fmt(gap, '+.1f'):>6} {_fmt(row['clip'], '.2f'):>5} {row['seconds']:>5.0f}",
                flush=True,
            )


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    main()

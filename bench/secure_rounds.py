"""Bytes and time per round with secure aggregation against plain uploads, whole rounds.

Runs ``fedge sim`` (the real agents and aggregator, over Mosquitto, devices on the hub
client, signed rounds and stage messages) at each fleet size, every device every round, once
per scheme, and prints one row per run: what one device uploads and downloads per round
(MQTT bytes: the update, or all four secure stages; the announcement, the model and the
aggregator's stage messages), the median round time (announcement to new model, rounds 2 on)
and the held-out accuracy after the last round. It never fails on a number.

Schemes: ``plain`` (the default codec, top-k 2% + int8), ``float32`` (dense, exact),
``secure`` (dense, 8-bit quantisation in the ring, complete graph up to ``--complete-max``
devices, SecAgg+ with the smallest even k >= 3 log2 N above), ``secure-topk`` (the default
codec under secure aggregation: the round's shared random index set).

    .venv/bin/python bench/secure_rounds.py                          # 10 and 100 devices
    .venv/bin/python bench/secure_rounds.py --fleets 1000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from fedge.fleet.sim import SimOptions, run_sim
from machine import machine_line  # bench/machine.py

SCHEMES = ("plain", "float32", "secure", "secure-topk")


def degree_for(devices: int, complete_max: int) -> int | None:
    if devices <= complete_max:
        return None
    k = math.ceil(3 * math.log2(devices))
    return k + (k % 2)


def one_run(args: argparse.Namespace, devices: int, scheme: str) -> dict:
    out = Path(args.out) / f"n{devices}-{scheme}"
    secure = scheme.startswith("secure")
    degree = degree_for(devices, args.complete_max) if secure else None
    t0 = time.perf_counter()
    summary = run_sim(
        SimOptions(
            devices=devices,
            rounds=args.rounds,
            codec="float32" if scheme in ("float32", "secure") else "topk:0.02+int8",
            strategy="fedavg",
            seed=args.seed,
            out=out,
            broker="mosquitto",
            baselines=False,
            show_progress=False,
            eval_fraction=0.0,
            round_timeout=args.round_timeout,
            secure=secure,
            secure_degree=degree,
        )
    )
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    done = [r for r in rounds if r["status"] == "done"]
    up = [r["bytes_received"] / r["selected"] for r in done]
    return {
        "devices": devices,
        "scheme": scheme,
        "degree": "complete" if secure and degree is None else degree,
        "rounds": f"{len(done)}/{args.rounds}",
        "up_per_device": statistics.median(up) if up else None,
        "down_per_device": statistics.median(r["bytes_down_per_device"] for r in done)
        if done
        else None,
        "round_s": statistics.median(r["duration_s"] for r in done[1:] or done) if done else None,
        "accuracy": summary.get("final_accuracy"),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fleets", default="10,100", help="device counts, comma-separated")
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--complete-max", type=int, default=30)
    parser.add_argument("--round-timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/fedge-bench-secure")
    args = parser.parse_args()
    print(machine_line())
    print(
        f"{'devices':>7} {'scheme':<12} {'graph':>8} {'rounds':>6} {'up/device':>10}"
        f" {'down/device':>11} {'round':>8} {'accuracy':>8} {'wall':>6}"
    )
    for devices in (int(x) for x in args.fleets.split(",")):
        for scheme in args.schemes.split(","):
            row = one_run(args, devices, scheme)
            up, down = row["up_per_device"], row["down_per_device"]
            took, acc = row["round_s"], row["accuracy"]
            print(
                f"{devices:>7} {scheme:<12} {row['degree'] or '-'!s:>8} {row['rounds']:>6}"
                f" {'-' if up is None else f'{up:,.0f}':>10}"
                f" {'-' if down is None else f'{down:,.0f}':>11}"
                f" {'-' if took is None else f'{took:.2f} s':>8}"
                f" {'-' if acc is None else f'{100 * acc:.2f}%':>8}"
                f" {row['wall_s']:>5.0f}s",
                flush=True,
            )


if __name__ == "__main__":
    main()

"""The predictive-maintenance fleet over seeds: medians of every policy's figures.

Runs ``fedge sim --scenario maintenance`` (20 pumps, 30 rounds, an embedded broker) once per
seed, or reads ``OUT/sSEED/summary.json`` where a run already left one, and prints per
policy the median (min-max) over seeds of: failures caught in time, recall, precision, mean
lead time, cost per 1,000 machine-hours; then the first failures of machines that had never
failed, and the run times.

    .venv/bin/python bench/maintenance.py --seeds 0,1,2,3,4 --out runs/maintenance
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from statistics import median

from machine import machine_line

POLICIES = ("federated", "device_alone", "centralised", "fixed_schedule")


def spread(values: list[float], fmt: str) -> str:
    return f"{format(median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--machines", type=int, default=20)
    parser.add_argument("--out", default="runs/maintenance")
    args = parser.parse_args()
    print(machine_line())
    summaries = []
    for seed in (int(s) for s in args.seeds.split(",")):
        out = Path(args.out) / f"s{seed}"
        if not (out / "summary.json").exists():
            subprocess.run(
                [
                    *(sys.executable, "-m", "fedge.cli", "sim", "--scenario", "maintenance"),
                    *("--devices", str(args.machines), "--seed", str(seed), "--out", str(out)),
                ],
                check=True,
            )
        summaries.append(json.loads((out / "summary.json").read_text()))
    print(f"{len(summaries)} seeds, {args.machines} machines each")
    print(
        f"{'policy':15s} {'caught':>12s} {'recall':>16s} {'precision':>16s}"
        f" {'lead h':>16s} {'cost per 1000 h':>26s}"
    )
    for name in POLICIES:
        got = [s["policies"][name] for s in summaries]
        print(
            f"{name:15s} {spread([g['caught_in_time'] for g in got], '.0f'):>12s}"
            f" {spread([g['recall'] for g in got], '.2f'):>16s}"
            f" {spread([g['precision'] for g in got], '.2f'):>16s}"
            f" {spread([g['mean_lead_h'] for g in got], '.2f'):>16s}"
            f" {spread([g['cost_per_1000h'] for g in got], '.0f'):>26s}"
        )
    print("first failure of a machine that had never failed (caught in time / such failures):")
    for name in POLICIES:
        got = [s["first_failure_of_never_failed"].get(name) for s in summaries]
        pairs = [f"{g['caught_in_time']}/{g['lives']}" for g in got if g]
        print(f"  {name:15s} {' '.join(pairs)}")
    fed_vs_alone = [
        s["policies"]["federated"]["caught_in_time"]
        - s["policies"]["device_alone"]["caught_in_time"]
        for s in summaries
    ]
    cheaper = [
        s["policies"]["fixed_schedule"]["cost_per_1000h"]
        - s["policies"]["federated"]["cost_per_1000h"]
        for s in summaries
    ]
    print(f"federated minus device alone, caught in time, per seed: {fed_vs_alone}")
    print(
        f"fixed schedule minus federated, cost per 1000 h, per seed: {[round(c) for c in cheaper]}"
    )
    secs = [s["seconds"] for s in summaries]
    print(
        "seconds per run (wall): total "
        + spread([t["total"] for t in secs], ".0f")
        + ", precompute "
        + spread([t["precompute"] for t in secs], ".0f")
        + " (CPU "
        + spread([t["precompute_cpu"] for t in secs], ".0f")
        + ")"
        + ", stream "
        + spread([t["stream"] for t in secs], ".0f")
        + ", federate "
        + spread([t["federate"] for t in secs], ".0f")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Federated evaluation: how closely do the devices' own scores track the held-out accuracy?

In the field there is no central test set: each selected device scores the global model on
the newest 10% of its data (at least 10 examples) before it trains, and the aggregator
weights the scores by the examples scored. This bench runs ``fedge sim`` (the real agents and
aggregator over the embedded broker) on digits with 10 devices, for each partition scheme and
seed, and compares, per model version, the devices' accuracy with the aggregator's held-out
accuracy (397 samples) of the same model: the devices of round r score the model round r-1
made, so round r's federated score is paired with round r-1's held-out score (round 1
scores the initial model, which has no held-out score, and is left out).

It prints per round (median over seeds) the devices' accuracy, the held-out accuracy of the
same model and the gap (devices - held-out), then per scheme the median absolute gap over
rounds for each seed and its median over seeds. With ``--cost`` it also runs every seed with
federated evaluation off, to show what holding 10% out of training costs in held-out accuracy.
It never fails on a number.

    .venv/bin/python bench/fed_eval.py                      # 3 seeds x 2 schemes, 20 rounds
    .venv/bin/python bench/fed_eval.py --cost               # and the same with evaluation off
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from fedge.fleet.fed_eval import Point, aligned, median_gap
from fedge.fleet.sim import SimOptions, run_sim
from machine import machine_line  # bench/machine.py

SCHEMES = ("iid", "dominant:0.9")


def one_run(args: argparse.Namespace, scheme: str, seed: int, eval_fraction: float) -> Path:
    out = Path(args.out) / f"eval{eval_fraction:g}" / scheme.replace(":", "-") / f"seed{seed}"
    run_sim(
        SimOptions(
            devices=args.devices,
            rounds=args.rounds,
            partition=scheme,
            seed=seed,
            out=out,
            eval_fraction=eval_fraction,
            baselines=False,
            show_progress=False,
        )
    )
    return out


def rounds_of(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def last5(rounds: list[dict[str, Any]]) -> float:
    accs = [r["accuracy"] for r in rounds if r.get("accuracy") is not None][-5:]
    return sum(accs) / len(accs)


def _med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "    n/a"
    return f"{100 * x:+7.2f}" if signed else f"{100 * x:7.2f}"


def report(scheme: str, seeds: list[int], points: dict[int, list[Point]]) -> float | None:
    print(f"\n{scheme}: per round, median over seeds {seeds} (accuracy %, gap in points)")
    print(f"{'round':>5s} {'model of':>8s} {'devices':>8s} {'held-out':>8s} {'gap':>8s} {'n':>5s}")
    by_round: dict[int, list[Point]] = {}
    for seed in seeds:
        for i, p in enumerate(points[seed], start=1):  # the i-th round with a device score
            by_round.setdefault(i, []).append(p)
    for i, ps in sorted(by_round.items()):
        central = [p.central for p in ps if p.central is not None]
        gaps = [p.federated - p.central for p in ps if p.central is not None]
        print(
            f"{i:5d} {'round ' + str(ps[0].made_by):>8s} {_pct(_med([p.federated for p in ps]))}"
            f"  {_pct(_med(central))} {_pct(_med(gaps), signed=True)}"
            f" {statistics.median(p.count for p in ps):5.0f}"
        )
    per_seed = {s: median_gap(points[s]) for s in seeds}
    cells = "  ".join(f"seed {s} {_pct(g).strip()}" for s, g in per_seed.items())
    overall = _med([g for g in per_seed.values() if g is not None])
    print(f"median |gap| over rounds: {cells}; median over seeds {_pct(overall).strip()} points")
    return overall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--eval-fraction", type=float, default=0.1)
    ap.add_argument("--cost", action="store_true", help="also run with federated evaluation off")
    ap.add_argument("--out", default="runs/bench-fed-eval")
    args = ap.parse_args()
    print(f"machine: {machine_line()}; {time.strftime('%Y-%m-%d')}", flush=True)
    started = time.perf_counter()
    gaps: dict[str, float | None] = {}
    finals: dict[tuple[str, float], list[float]] = {}
    for scheme in SCHEMES:
        points: dict[int, list[Point]] = {}
        for seed in args.seeds:
            t0 = time.perf_counter()
            rounds = rounds_of(one_run(args, scheme, seed, args.eval_fraction))
            points[seed] = aligned(rounds, "accuracy")
            finals.setdefault((scheme, args.eval_fraction), []).append(last5(rounds))
            print(
                f"{scheme} seed {seed}: {len(rounds)} rounds, final held-out"
                f" {_pct(rounds[-1]['accuracy']).strip()}%, median |gap|"
                f" {_pct(median_gap(points[seed])).strip()} points"
                f" ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
            if args.cost:
                off = rounds_of(one_run(args, scheme, seed, 0.0))
                finals.setdefault((scheme, 0.0), []).append(last5(off))
        gaps[scheme] = report(scheme, args.seeds, points)
    print("\nsummary: median over seeds of the median |devices - held-out| over rounds")
    for scheme, gap in gaps.items():
        print(f"  {scheme:14s} {_pct(gap).strip()} points")
    if args.cost:
        print("\nheld-out accuracy, last 5 rounds, median over seeds: evaluation on vs off")
        for scheme in SCHEMES:
            on = statistics.median(finals[(scheme, args.eval_fraction)])
            off = statistics.median(finals[(scheme, 0.0)])
            print(f"  {scheme:14s} {_pct(on).strip()}% vs {_pct(off).strip()}%")
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()

"""The scale curve: round time, aggregation time per update and aggregator memory against the
number of devices that answer each round (every device, every round).

Round time: ``fedge sim --devices N --devices-per-round 0 --clients hub --broker mosquitto
--runtime numpy`` (bench/scale.py; one process, a Mosquitto of its own; the run folder on
tmpfs, /dev/shm, so that a thousand devices' state files on one disk do not set the pace: a
real device has its own). Aggregation per update and memory: one round of N float32 updates of
the 50k model through a real aggregator (bench/aggregation.py), the running sum (the default
mean) beside the median that keeps every delta. Writes bench/scale-curve.png.

    .venv/bin/python bench/scale_curve.py
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from aggregation import one_round
from scale import run

HERE = Path(__file__).resolve().parent


def main() -> None:
    logging.getLogger("fedge").setLevel(logging.ERROR)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="10,100,300,1000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--png", default=str(HERE / "scale-curve.png"))
    args = ap.parse_args()
    ns = [int(x) for x in args.devices.split(",")]
    shm = Path("/dev/shm")
    out = Path(tempfile.mkdtemp(prefix="fedge-scale-", dir=shm if shm.is_dir() else None))
    sims, aggs = [], {}
    try:
        for n in ns:
            row = run(n, "hub", args.rounds, 0, out, 900.0, "numpy")
            sims.append(row)
            print(row, flush=True)
            for robust in ("mean", "median"):
                with tempfile.TemporaryDirectory(prefix="fedge-agg-") as tmp:
                    aggs[n, robust] = one_round(n, robust, Path(tmp))
                print(n, robust, aggs[n, robust], flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 4))
    done = [r for r in sims if r.get("median_round_s") is not None]
    a.plot([r["devices"] for r in done], [r["median_round_s"] for r in done], "o-")
    a.set(
        title="fedge sim: median round (every device trains)",
        xlabel="devices per round",
        ylabel="seconds",
        xscale="log",
        yscale="log",
    )
    for robust, style in (("mean", "o-"), ("median", "s--")):
        b.plot(ns, [aggs[n, robust]["update_ms"] for n in ns], style, label=robust)
        c.plot(ns, [aggs[n, robust]["peak_mb"] for n in ns], style, label=robust)
    b.set(
        title="aggregator: time per update (50k model)",
        xlabel="devices per round",
        ylabel="ms (median)",
        xscale="log",
        ylim=(0, None),
    )
    c.set(
        title="aggregator: memory in a round (50k model)",
        xlabel="devices per round",
        ylabel="MB (tracemalloc peak)",
        xscale="log",
        yscale="log",
    )
    b.legend(title="combine")
    c.legend(title="combine")
    for ax in (a, b, c):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()

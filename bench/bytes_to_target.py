"""Bytes to a target accuracy: float32 FedAvg vs fedge's default gate + codec + error feedback.

One invocation runs, per seed, 10 devices on digits with ``dominant:0.9`` partitions and
the 50,826-parameter model (``digits_mlp_50k``) for 60 rounds, twice: plain float32
FedAvg, and fedge's defaults (``fedge sim`` without options: FedAdam, the default codec
with error feedback and the default upload gate). Bytes are MQTT bytes of the updates and
skip notices the aggregator received (whole PUBLISH packets). It prints, for both, the
rounds and the bytes uploaded to first reach the target accuracy, the bytes over all
rounds, the share of scheduled uploads the gate suppressed in rounds 31-60, and the final
accuracy (mean of the last 5 rounds), as medians over the seeds; its last line is the
ratio of bytes-to-target.

    .venv/bin/python bench/bytes_to_target.py                    # 3 seeds, about 2 minutes
    .venv/bin/python bench/bytes_to_target.py --variant codec=topk:0.05+int8
"""

from __future__ import annotations

import argparse
import json
import statistics
from importlib import resources
from pathlib import Path
from typing import Any

from fedge.agent.radio import LTE
from fedge.fleet.sim import SimOptions, round_energy, run_sim


def model_50k() -> Path:
    return Path(str(resources.files("fedge.models") / "artifacts" / "digits_mlp_50k.tflite"))


def measure(out: Path, target: float) -> dict[str, Any]:
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    cumulative, both, first, to_target, both_to_target = 0, 0, None, None, None
    lte_joules, lte_to_target = 0.0, None
    for r in rounds:
        cumulative += r["bytes_received"]
        # What the devices downloaded: the announcement and the model (whole, or a delta)
        # each selected device received for the round, with their acknowledgements (a quiet
        # device's inbox: its own catch-up), and what devices listening to every round heard.
        down = r.get("bytes_down_per_device", 0)
        by_device = r.get("bytes_down_by_device", {})
        selected = r.get("participants", []) + r.get("skipped", []) + r.get("missing", [])
        both += r["bytes_received"] + sum(by_device.get(d, down) for d in selected)
        both += down * r.get("listening", 0)
        lte_joules += sum(round_energy(r, LTE))
        if first is None and r.get("accuracy", 0.0) >= target:
            first, to_target, both_to_target = r["round"], cumulative, both
            online = len(selected) + r.get("listening", 0) + r.get("sleeping", 0)
            lte_to_target = lte_joules / max(1, online)
    late = [r for r in rounds if r["round"] > 30]
    scheduled = sum(r["selected"] for r in late)
    held = sum(len(r.get("skipped", [])) for r in late)
    return {
        "rounds_to_target": first,
        "bytes_to_target": to_target,
        "bytes_total": cumulative,
        "both_to_target": both_to_target,
        "both_total": both,
        "suppressed_31_60": held / scheduled if scheduled else 0.0,
        "final_accuracy": summary["last5_accuracy"],
        "energy": summary.get("energy_j_per_device_round", {}),
        "lte_j_per_device_to_target": lte_to_target,
    }


def median(values: list[Any]) -> Any:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--target", type=float, default=0.93)
    p.add_argument("--out", default="runs/bench-bytes")
    p.add_argument("--devices", type=int, default=10)
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="KEY=VALUE overrides for the fedge run, e.g. codec=topk:0.05+int8",
    )
    args = p.parse_args()
    overrides: dict[str, Any] = {}
    for item in args.variant:
        key, _, value = item.partition("=")
        field_type = type(getattr(SimOptions(), key))
        if key == "downlink_codec":
            field_type = str
        if field_type is bool:
            overrides[key] = value.lower() in ("1", "true", "yes")
        else:
            overrides[key] = field_type(value) if field_type is not type(None) else float(value)
    configs = {
        "float32 FedAvg": {"strategy": "fedavg", "codec": "float32", "gate_threshold": 0.0},
        "fedge default": overrides,
    }
    d = SimOptions(**overrides)
    print(
        f"fedge run: strategy {d.strategy}, codec {d.codec}, gate threshold {d.gate_threshold}, "
        f"max skips {d.gate_max_skips}, downlink {d.downlink_codec or 'whole models'}"
        f" (resync every {d.resync_every}); {args.devices} devices, dominant:0.9,"
        f" {args.rounds} rounds, "
        f"E={d.epochs}, target {args.target:.0%}"
    )
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    for seed in args.seeds:
        for name, kw in configs.items():
            out = Path(args.out) / name.replace(" ", "-") / f"seed{seed}"
            run_sim(
                SimOptions(
                    devices=args.devices,
                    rounds=args.rounds,
                    partition="dominant:0.9",
                    seed=seed,
                    out=out,
                    model=model_50k(),
                    show_progress=False,
                    baselines=False,
                    **kw,
                )
            )
            m = measure(out, args.target)
            results[name].append(m)
            print(
                f"  seed {seed} {name:15s} rounds {m['rounds_to_target']}, to target "
                f"{m['bytes_to_target']} B (up + down {m['both_to_target']} B), total"
                f" {m['bytes_total']} B (up + down {m['both_total']} B), suppressed "
                f"{m['suppressed_31_60']:.0%}, final {m['final_accuracy']:.2%}",
                flush=True,
            )
    print(f"\nmedians over seeds {args.seeds}")
    print(
        f"{'':15s} {'rounds':>6s} {'bytes to target':>16s} {'bytes, all rounds':>18s} "
        f"{'suppressed 31-60':>16s} {'final acc':>9s} {'J/dev/round wifi':>16s} {'lte':>6s}"
        f" {'up+down to target':>18s} {'up+down, all':>14s}"
    )
    med = {}
    for name, rows in results.items():
        med[name] = {k: median([r[k] for r in rows]) for k in rows[0] if k != "energy"}
        wifi = median([r["energy"].get("wifi") for r in rows])
        lte = median([r["energy"].get("lte") for r in rows])
        m = med[name]
        print(
            f"{name:15s} {m['rounds_to_target'] or '-':>6} {m['bytes_to_target'] or 0:>16,} "
            f"{m['bytes_total']:>18,} {m['suppressed_31_60']:>16.0%} {m['final_accuracy']:>9.2%} "
            f"{wifi:>16.3f} {lte:>6.2f} {m['both_to_target'] or 0:>18,} {m['both_total']:>14,}"
        )
    base, ours = med["float32 FedAvg"], med["fedge default"]
    if base["rounds_to_target"] and ours["rounds_to_target"]:
        print(f"rounds to target: {ours['rounds_to_target'] / base['rounds_to_target']:.2f}x")
    print(
        f"bytes over all rounds: {base['bytes_total'] / ours['bytes_total']:.1f}x fewer; "
        f"final accuracy {100 * (ours['final_accuracy'] - base['final_accuracy']):+.2f} points"
    )
    if base["bytes_to_target"] and ours["bytes_to_target"]:
        print(f"bytes to target: {base['bytes_to_target'] / ours['bytes_to_target']:.1f}x fewer")
        print(
            f"up + down to target: {base['both_to_target'] / ours['both_to_target']:.1f}x fewer;"
            f" over all rounds {base['both_total'] / ours['both_total']:.1f}x"
        )
    else:
        print("bytes to target: a run did not reach the target")
    lte = [median([r["energy"].get("lte") for r in rows]) for rows in results.values()]
    if all(lte):
        print(f"LTE energy per device and round: {lte[0] / lte[1]:.2f}x lower")
    if base["lte_j_per_device_to_target"] and ours["lte_j_per_device_to_target"]:
        print(
            f"LTE energy per device to target: {base['lte_j_per_device_to_target']:.1f} J against"
            f" {ours['lte_j_per_device_to_target']:.1f} J,"
            f" {base['lte_j_per_device_to_target'] / ours['lte_j_per_device_to_target']:.2f}x lower"
        )


if __name__ == "__main__":
    main()

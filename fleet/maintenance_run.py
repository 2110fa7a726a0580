"""``fedge sim --scenario maintenance``: the pump fleet over serial ports and MQTT, then scored.

See :mod:`fedge.fleet.maintenance` for what is compared. Writes ``summary.json`` (every
policy's score, the fleet, timings), ``rounds.jsonl`` (the aggregator's log) and
``maintenance.png`` (a few machines' temperatures with the failures and each policy's
warnings) under ``out``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from fedge.agent.config import TaskConfig
from fedge.agent.dataset import Dataset
from fedge.agent.tasks import TaskError, failure
from fedge.aggregator.config import AggregatorConfig, SampleLimits
from fedge.aggregator.service import build_aggregator
from fedge.aggregator.strategies.config import StrategyConfig
from fedge.models.runtime import load_runtime
from fedge.protocol import TrainingConfig

from .maintenance import (
    READING_S,
    WINDOW,
    FleetPlan,
    Warner,
    failure_model,
    model_warner,
    outcomes,
    plan_fleet,
    scale,
    schedule_warner,
    train_model,
)
from .maintenance_policies import Costs, Outcome, score
from .pump_fleet import CENTER, CHANNELS, SCALE, frames
from .sensor_fleet import SerialFleet
from .signing_keys import write_signing_pair

log = logging.getLogger("fedge.fleet")
POLICIES = ("federated", "device_alone", "centralised", "fixed_schedule")


def run_maintenance(
    *,
    machines: int,
    rounds: int,
    broker: str,
    out: Path,
    seed: int = 0,
    epochs: int = 2,
    lr: float = 0.1,
    horizon: int = 90,
    threshold: float = 0.5,
    confirm: int = 3,
    min_lead: int = 10,
    schedule_quantile: float = 0.1,
    costs: Costs | None = None,
    fleet: str = "pumps",
    round_timeout: float = 60.0,
    rate_hz: float = 500.0,
    broker_for: Any = None,
    picture: bool = True,
    history_h: tuple[float, float] = (1.0, 8.0),
    future_h: float = 30.0,
) -> dict[str, Any]:
    costs = costs or Costs()
    started = time.monotonic()
    cpu0 = time.process_time()
    out.mkdir(parents=True, exist_ok=True)
    state = out / "state"
    state.mkdir(exist_ok=True)
    (out / "rounds.jsonl").unlink(missing_ok=True)
    plan = plan_fleet(machines, seed=seed, monitor=True, history_h=history_h, future_h=future_h)
    precomputed = time.monotonic() - started
    precomputed_cpu = time.process_time() - cpu0
    assert plan.monitor is not None
    x, y = failure(scale(plan.monitor), WINDOW, horizon, balance=False)
    np.savez(out / "heldout.npz", x=x, y=y)

    url = broker_for or (lambda client: broker)
    stop, fed_stop = threading.Event(), threading.Event()
    signing_key, public_key = write_signing_pair(state)
    task = TaskConfig(
        kind="failure",
        window=WINDOW,
        horizon=horizon,
        center=CENTER,
        scale=SCALE,
        history=max(plan.history) + 1,
        min_examples=16,
    )
    serial = SerialFleet(fed_stop)
    for m in range(machines):
        serial.add(
            out,
            frames(plan.history_readings(m), READING_S),
            rate_hz,
            device_id=f"pump{m:03d}",
            fleet=fleet,
            broker=url(f"{fleet}-pump{m:03d}"),
            model=failure_model(),
            task=task,
            state_dir=state,
            seed=seed * 1000 + m,
            aggregator_keys=(public_key,),
        )
    agents = serial.agents
    agg = build_aggregator(
        AggregatorConfig(
            fleet=fleet,
            broker=url(f"{fleet}-aggregator"),
            client_id=f"{fleet}-aggregator",
            signing_key=signing_key,
            model=failure_model(),
            state_dir=state,
            rounds=rounds,
            min_devices=machines,
            quorum=0.5,
            round_timeout=round_timeout,
            eval_data=out / "heldout.npz",
            training=TrainingConfig(
                epochs=epochs, batch_size=32, lr=lr, codec="float16", eval_fraction=0.0
            ),
            strategy=StrategyConfig(name="fedavg"),
            # Histories differ eightfold by design (devices joined at different times) and
            # the failure task repeats positives: the 3x-median cap on declared counts would
            # clip every device that has seen failures, every round. The counts are honest.
            samples=SampleLimits(median_factor=0),
            log=out / "rounds.jsonl",
            seed=seed,
        )
    )
    datasets: list[Dataset | None] = []
    try:
        serial.feed()
        # Until every device has stored its machine's history.
        streamed = serial.wait_stored(plan.history, 120.0)
        if streamed < sum(plan.history):
            log.warning("devices stored %d of %d history samples", streamed, sum(plan.history))
        streaming = time.monotonic() - started - precomputed
        serial.run(agg, stop, round_timeout * (rounds + 2))
        for agent in agents:  # what each device trained on, read back from its own store
            try:
                datasets.append(agent.sensor.dataset())
            except TaskError:
                datasets.append(None)
        global_weights = {k: np.array(v) for k, v in agg.weights.items()}
    finally:
        serial.close(agg, stop)
    federated_s = time.monotonic() - started - precomputed - streaming
    lines = [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()]

    # The comparison models: as many epochs as a device trained in the rounds.
    total_epochs = rounds * epochs
    fed = load_runtime(failure_model(), prefer=("numpy",))
    fed.set_weights(global_weights)
    alone = {
        m: train_model(
            failure_model(), [d], epochs=total_epochs, batch_size=32, lr=lr, seed=seed + m
        )
        for m, d in enumerate(datasets)
        if d is not None
    }
    pooled = [d for d in datasets if d is not None]
    central = train_model(
        failure_model(), pooled, epochs=total_epochs, batch_size=32, lr=lr, seed=seed
    )
    interval = float(np.quantile(plan.history_lives, schedule_quantile))

    def alone_warner(life):  # type: ignore[no-untyped-def]
        runtime = alone.get(life.machine)
        if runtime is None:  # too little history to train: no model, no warning
            return None
        return model_warner(runtime, threshold=threshold, confirm=confirm)(life)

    warners: dict[str, Warner] = {
        "federated": model_warner(fed, threshold=threshold, confirm=confirm),
        "device_alone": alone_warner,
        "centralised": model_warner(central, threshold=threshold, confirm=confirm),
        "fixed_schedule": schedule_warner(interval),
    }
    reading_h = READING_S / 3600.0

    def scored(done: list[Outcome]) -> dict[str, float]:
        return score(
            done, reading_h=reading_h, min_lead=min_lead, warn_window=2 * horizon, costs=costs
        ).as_dict()

    scores: dict[str, Any] = {}
    first: dict[str, Any] = {}
    warnings_at: dict[str, list[int | None]] = {}
    first_lives = [life for life in plan.futures if life.first_failure]
    for name, warn in warners.items():
        done = outcomes(plan.futures, warn)
        warnings_at[name] = [o.warned_at for o in done]
        scores[name] = scored(done)
        if first_lives:
            first[name] = scored(outcomes(first_lives, warn))
    summary: dict[str, Any] = {
        "machines": machines,
        "seed": seed,
        "rounds_completed": len([r for r in lines if r["status"] == "done"]),
        "channels": list(CHANNELS),
        "history_readings": plan.history,
        "failures_in_history": [
            len([f for f in run.failures if f < plan.history[m]]) for m, run in enumerate(plan.runs)
        ],
        "never_failed": plan.never_failed(),
        "future_lives": len(plan.futures),
        "samples_streamed": streamed,
        "settings": {
            "reading_s": READING_S,
            "window": WINDOW,
            "horizon_readings": horizon,
            "threshold": threshold,
            "confirm": confirm,
            "min_lead_readings": min_lead,
            "schedule_quantile": schedule_quantile,
            "schedule_interval_h": interval * reading_h,
            "rounds": rounds,
            "epochs": epochs,
            "lr": lr,
            "costs": asdict(costs),
        },
        "policies": scores,
        "first_failure_of_never_failed": first,
        "seconds": {
            "precompute": round(precomputed, 1),
            "precompute_cpu": round(precomputed_cpu, 1),
            "stream": round(streaming, 1),
            "federate": round(federated_s, 1),
            "total": round(time.monotonic() - started, 1),
        },
    }
    if picture:
        summary["picture"] = str(_picture(plan, warnings_at, out / "maintenance.png"))
    summary["seconds"]["total"] = round(time.monotonic() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def cost_table(summary: dict[str, Any]) -> str:
    """The policies side by side, as text."""
    rows = [
        f"{'policy':16s} {'recall':>7s} {'precision':>9s} {'lead h':>7s} {'planned':>8s}"
        f" {'failures':>8s} {'cost':>10s} {'per 1000 h':>10s}"
    ]
    for name, s in summary["policies"].items():
        rows.append(
            f"{name:16s} {s['recall']:7.2f} {s['precision']:9.2f} {s['mean_lead_h']:7.2f}"
            f" {s['planned']:8d} {s['unplanned']:8d} {s['cost']:10.0f} {s['cost_per_1000h']:10.0f}"
        )
    return "\n".join(rows)


def _picture(plan: FleetPlan, warnings_at: dict[str, list[int | None]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    never = set(plan.never_failed())
    chosen: list[int] = []
    for m in sorted({life.machine for life in plan.futures}, key=lambda m: (m not in never, m)):
        if len(chosen) < 3:
            chosen.append(m)
    fig, axes = plt.subplots(len(chosen), 1, figsize=(10, 2.6 * len(chosen)), squeeze=False)
    colours = dict(
        zip(POLICIES, ("tab:blue", "tab:orange", "tab:green", "tab:purple"), strict=True)
    )
    for ax, m in zip(axes[:, 0], chosen, strict=True):
        h = plan.history[m]
        run = plan.runs[m]
        t = np.arange(len(run.readings)) * READING_S / 3600.0
        for c, name, shade in (
            (2, "thrust bearing", "0.2"),
            (3, "radial", "0.5"),
            (4, "oil", "0.75"),
        ):
            ax.plot(t, run.readings[:, c], lw=0.7, color=shade, label=f"{name} (K)")
        ax.axvspan(0, h * READING_S / 3600.0, color="0.92", label="history (devices' data)")
        for f in run.failures:
            ax.axvline(f * READING_S / 3600.0, color="red", lw=1.2)
        for k, life in enumerate(plan.futures):
            if life.machine != m:
                continue
            for name, at in warnings_at.items():
                warned = at[k]
                if warned is not None:
                    x = (life.begin + life.start + warned) * READING_S / 3600.0
                    ax.axvline(x, color=colours[name], ls="--", lw=1.0)
        tag = "never failed before" if m in never else f"{len(run.failures)} failures in record"
        ax.set_title(
            f"pump{m:03d} ({tag}): run to failure (red); dashed: where each policy would have"
            " warned (and replaced the pump)",
            fontsize=9,
        )
        ax.set_ylabel("K", fontsize=9)
    handles = [plt.Line2D([], [], color=c, ls="--", label=n) for n, c in colours.items()]
    handles.append(plt.Line2D([], [], color="red", label="failure"))
    axes[0, 0].legend(
        handles=[*axes[0, 0].get_legend_handles_labels()[0], *handles],
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    axes[-1, 0].set_xlabel(
        "hours of pump time (grey: the history the devices learned from)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

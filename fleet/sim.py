"""``fedge sim``: an aggregator and N agents on one machine, over a real MQTT broker.

Each agent is the same :class:`fedge.agent.daemon.Agent` a device runs, built from
its own config, with its own MQTT client and its own data partition; only the
threads are shared. With no ``--broker`` an embedded amqtt broker is started.

One partition scheme writes into ``OUT/``; several (``--partition iid,single``) write
one folder each (``OUT/iid/``, ``OUT/single/``) and an ``OUT/summary.json`` naming them.
A run folder holds ``rounds.jsonl`` (the aggregator's line per round),
``baselines.jsonl`` (centralised, non-participant and device-local scores per round),
``summary.json``, and the partitions and state it generated.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from fedge.agent.config import AgentConfig
from fedge.agent.daemon import Agent
from fedge.agent.dataset import Dataset
from fedge.agent.service import build_agent
from fedge.aggregator.config import AggregatorConfig
from fedge.aggregator.service import build_aggregator
from fedge.aggregator.strategies.config import StrategyConfig
from fedge.protocol import GateSettings, TrainingConfig

from .baselines import LocalModels, Scorer, SoloTrainer
from .datasets import Split, digits, load_user_dataset
from .embedded_broker import EmbeddedBroker
from .partition import parse_scheme, partition
from .signing_keys import write_signing_pair

log = logging.getLogger("fedge.fleet")


class SimError(ValueError):
    """A simulation cannot start: bad options, data or model. ``str()`` is one line."""


@dataclass(frozen=True)
class SimOptions:
    devices: int = 10
    rounds: int = 20
    epochs: int = 5
    batch_size: int = 16
    lr: float = 0.1
    partition: str = "iid"  # one scheme, or several separated by commas
    seed: int = 0
    out: Path = Path("runs/sim")
    broker: str | None = None
    model: Path | None = None  # .tflite, or a spec (.json) to build; default: digits model
    dataset: Path | None = None  # .npz (x, y) or .csv; default: scikit-learn's digits
    label_column: str | None = None  # for a CSV data set
    runtime: str = "litert"
    round_timeout: float = 60.0
    fleet: str = "sim"
    strategy: str = "fedadam"
    server_lr: float | None = None
    momentum: float = 0.9
    mu: float = 0.0  # FedProx
    codec: str = "topk:0.02+int8"  # how devices encode deltas (protocol.codecs)
    gate_threshold: float = 0.1  # ||delta|| / (lr ||w_global||) below which a device skips
    gate_max_skips: int = 2
    gate_min_agreement: float | None = None
    max_payload: int = 0  # chunk updates above this many bytes; 0: never
    baselines: bool = True
    show_progress: bool = True


def bundled_model() -> Path:
    return Path(str(resources.files("fedge.models") / "artifacts" / "digits_mlp.tflite"))


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x=x, y=y)
    return path


def load_data(opts: SimOptions) -> Split:
    if opts.dataset is None:
        return digits(opts.seed)
    return load_user_dataset(opts.dataset, label_column=opts.label_column, seed=opts.seed)


def resolve_model(opts: SimOptions, split: Split) -> Path:
    """The ``.tflite`` every device starts from, built from a spec when needed."""
    features = int(split.x_train.shape[1])
    if opts.model is None and opts.dataset is None:
        return bundled_model()
    if opts.model is not None and opts.model.suffix == ".tflite":
        path = opts.model
    else:
        from fedge.models.spec import DenseLayer, ModelSpec, load_spec

        if opts.model is not None:
            spec = load_spec(opts.model)
        else:  # a user's data set and no model: one hidden layer sized like the digits model
            name = (opts.dataset.stem if opts.dataset else "model").replace(" ", "_")[:48]
            spec = ModelSpec(
                name=f"{name}_mlp",
                input_size=features,
                layers=(DenseLayer(units=64, activation="relu"),),
                outputs=split.classes,
                seed=opts.seed,
            )
        if spec.input_size != features or spec.outputs < split.classes:
            raise SimError(
                f"model spec {spec.name} takes {spec.input_size} inputs and {spec.outputs} classes;"
                f" the data has {features} features and {split.classes} classes"
            )
        from fedge.models.builder import BuildError, build_file

        opts.out.mkdir(parents=True, exist_ok=True)
        try:
            path = build_file(spec, opts.out / f"{spec.name}.tflite")
        except BuildError as exc:
            raise SimError(
                f"{exc} (or pass --model FILE.tflite built for {features} inputs and"
                f" {split.classes} classes)"
            ) from exc
    from fedge.models.runtime import RuntimeError_, load_runtime

    try:
        rt = load_runtime(path)
        outputs = rt.infer(split.x_test[:1]).shape[-1]
    except RuntimeError_ as exc:
        raise SimError(str(exc)) from exc
    except ValueError as exc:
        raise SimError(f"{path}: does not take {features} features per sample ({exc})") from exc
    if outputs < split.classes:
        raise SimError(f"{path}: model has {outputs} outputs, the data has {split.classes} classes")
    return path


def run_sim(opts: SimOptions) -> dict[str, Any]:
    """Run every partition scheme of ``opts``; returns the (combined) summary."""
    schemes = [s.strip() for s in opts.partition.split(",") if s.strip()]
    try:
        parsed = [parse_scheme(s) for s in schemes]
    except ValueError as exc:
        raise SimError(str(exc)) from exc
    if not parsed:
        raise SimError("--partition names no scheme")
    if len({p.slug for p in parsed}) != len(parsed):
        raise SimError(f"--partition names a scheme twice: {opts.partition}")
    split = load_data(opts)
    model = resolve_model(opts, split)
    if len(parsed) == 1:
        return _run_with_broker(opts, schemes[0], split, model, opts.out, opts.fleet)
    summaries = {}
    for text, scheme in zip(schemes, parsed, strict=True):
        if opts.show_progress:
            print(f"\n== partition {text} ==")
        summaries[scheme.slug] = _run_with_broker(
            opts, text, split, model, opts.out / scheme.slug, f"{opts.fleet}-{scheme.slug}"
        )
    combined = {"runs": list(summaries), "schemes": summaries}
    (opts.out / "summary.json").write_text(json.dumps(combined, indent=2) + "\n")
    return combined


def _run_with_broker(
    opts: SimOptions, scheme: str, split: Split, model: Path, out: Path, fleet: str
) -> dict[str, Any]:
    """One scheme, on an embedded broker of its own unless ``--broker`` names one."""
    broker = None if opts.broker is not None else EmbeddedBroker().start()
    try:
        return _run_one(opts, scheme, split, model, out, fleet, broker)
    finally:
        if broker is not None:
            broker.stop()


def _configs(
    opts: SimOptions,
    scheme: str,
    split: Split,
    model: Path,
    out: Path,
    fleet: str,
    embedded: EmbeddedBroker | None,
) -> tuple[list[AgentConfig], AggregatorConfig, list[np.ndarray]]:
    data_dir = _fresh_dir(out / "data")
    state_dir = _fresh_dir(out / "state")
    for name in ("rounds.jsonl", "baselines.jsonl", "summary.json"):
        (out / name).unlink(missing_ok=True)

    def broker_for(client_id: str) -> str:
        if embedded is not None:
            return embedded.url_for(client_id)
        return opts.broker or "mqtt://127.0.0.1:1883"

    try:
        parts = partition(scheme, split.y_train, opts.devices, np.random.default_rng(opts.seed))
    except ValueError as exc:
        raise SimError(f"--partition {scheme}: {exc}") from exc
    test = _write_npz(data_dir / "test.npz", split.x_test, split.y_test)
    signing_key, public_key = write_signing_pair(state_dir)
    agents = []
    for i, idx in enumerate(parts):
        device = f"dev{i:03d}"
        path = _write_npz(data_dir / f"{device}.npz", split.x_train[idx], split.y_train[idx])
        agents.append(
            AgentConfig(
                device_id=device,
                fleet=fleet,
                broker=broker_for(f"{fleet}-{device}"),
                model=model,
                data=path,
                state_dir=state_dir,
                runtime=(opts.runtime,),  # type: ignore[arg-type]
                seed=opts.seed * 1000 + i,
                max_payload=opts.max_payload,
                aggregator_keys=(public_key,),
            )
        )
    agg = AggregatorConfig(
        fleet=fleet,
        broker=broker_for(f"{fleet}-aggregator"),
        client_id=f"{fleet}-aggregator"[:64],
        signing_key=signing_key,
        model=model,
        state_dir=state_dir,
        rounds=opts.rounds,
        min_devices=opts.devices,
        quorum=0.5,
        round_timeout=opts.round_timeout,
        training=TrainingConfig(
            epochs=opts.epochs,
            batch_size=opts.batch_size,
            lr=opts.lr,
            mu=opts.mu,
            codec=opts.codec,
            gate=GateSettings(
                threshold=opts.gate_threshold,
                min_agreement=opts.gate_min_agreement,
                max_skips=opts.gate_max_skips,
            ),
        ),
        strategy=StrategyConfig(
            name=opts.strategy,  # type: ignore[arg-type]
            server_lr=opts.server_lr,
            momentum=opts.momentum,
        ),
        eval_data=test,
        log=out / "rounds.jsonl",
        seed=opts.seed,
    )
    return agents, agg, parts


def _run_one(
    opts: SimOptions,
    scheme: str,
    split: Split,
    model: Path,
    out: Path,
    fleet: str,
    embedded: EmbeddedBroker | None,
) -> dict[str, Any]:
    from .progress import RoundDisplay

    out.mkdir(parents=True, exist_ok=True)
    agent_cfgs, agg_cfg, parts = _configs(opts, scheme, split, model, out, fleet, embedded)
    display = RoundDisplay(opts.rounds, enabled=opts.show_progress)
    tracker = (
        _Baselines(opts, split, model, parts, out / "baselines.jsonl") if opts.baselines else None
    )

    def on_round(summary: dict[str, Any]) -> None:
        extra = None
        if tracker is not None and summary["status"] == "done":
            extra = tracker.round(summary)
        elif tracker is not None:
            tracker.locals.pop(summary["round"])  # a failed round's local models go unscored
        display.round_done(summary, extra)

    aggregator = build_aggregator(agg_cfg, on_round=on_round)
    agents = [build_agent(cfg) for cfg in agent_cfgs]
    if tracker is not None:
        for agent in agents:
            agent.on_trained = tracker.locals.hook(agent.device_id)
    stop = threading.Event()
    threads: list[threading.Thread] = []
    crashed: list[str] = []

    def serve(agent: Agent) -> None:
        try:
            agent.run(stop)
        except Exception:  # reported once and ends the run: a dead device thread would
            log.exception("agent %s stopped", agent.device_id)  # otherwise stall every round
            crashed.append(agent.device_id)
            stop.set()

    started = time.perf_counter()
    try:
        aggregator.start()
        for agent in agents:
            agent.start()
            t = threading.Thread(target=serve, args=(agent,), name=agent.device_id, daemon=True)
            t.start()
            threads.append(t)
        with display:
            deadline = time.monotonic() + opts.round_timeout * (opts.rounds + 2)
            while not aggregator.done and not stop.is_set() and time.monotonic() < deadline:
                aggregator.step(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        for agent in agents:
            try:
                agent.stop()
            except Exception as exc:  # one device failing to say goodbye must not skip the rest
                log.warning("agent %s did not stop cleanly: %s", agent.device_id, exc)
        aggregator.link.close()
        aggregator.store.close()
    if crashed:
        raise SimError(f"agent(s) {', '.join(crashed)} crashed; see the log above")
    elapsed = time.perf_counter() - started
    return _summarise(opts, scheme, out, agents, aggregator.strategy.describe(), elapsed)


class _Baselines:
    """Centralised, non-participant and device-local scores, one line per round."""

    def __init__(
        self, opts: SimOptions, split: Split, model: Path, parts: list[np.ndarray], path: Path
    ) -> None:
        self.path = path
        self.scorer = Scorer(model, split.x_test, split.y_test)

        def solo(x: np.ndarray, y: np.ndarray) -> SoloTrainer:
            return SoloTrainer(
                model,
                Dataset(x, y),
                epochs=opts.epochs,
                batch_size=opts.batch_size,
                lr=opts.lr,
                seed=opts.seed,
            )

        self.central = solo(split.x_train, split.y_train)
        own = parts[0]
        self.alone = solo(split.x_train[own], split.y_train[own])
        self.locals = LocalModels()

    def round(self, summary: dict[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = {
            "round": summary["round"],
            "centralised": self.central.round(self.scorer),
            "non_participant": self.alone.round(self.scorer),
            "local": {
                d: self.scorer.score(w)
                for d, w in sorted(self.locals.pop(summary["round"]).items())
            },
        }
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        return record


def _energy(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Mean radio energy per selected device per round, by link profile.

    Each device receives the announcement and the global model and answers (update or
    skip notice) within one radio wake: local training here takes well under the LTE tail
    of about 11.6 s. See fedge.agent.radio for the model and its sources.
    """
    from fedge.agent.radio import PROFILES, estimate

    out: dict[str, float] = {}
    for name, profile in PROFILES.items():
        joules = [
            estimate(
                profile,
                r.get("bytes_up_by_device", {}).get(d, 0),
                r.get("bytes_down_per_device", 0),
            ).joules
            for r in rounds
            for d in r.get("participants", []) + r.get("skipped", []) + r.get("missing", [])
        ]
        out[name] = round(float(np.mean(joules)), 4) if joules else 0.0
    return out


def _last5(values: list[float]) -> float | None:
    return float(np.mean(values[-5:])) if values else None


def _summarise(
    opts: SimOptions, scheme: str, out: Path, agents: list, strategy: str, elapsed: float
) -> dict[str, Any]:
    log_path = out / "rounds.jsonl"
    rounds = (
        [json.loads(line) for line in log_path.read_text().splitlines()]
        if log_path.exists()
        else []
    )
    done = [r for r in rounds if r["status"] == "done"]
    accs = [r["accuracy"] for r in done if "accuracy" in r]
    summary: dict[str, Any] = {
        "devices": opts.devices,
        "rounds_requested": opts.rounds,
        "rounds_completed": len(done),
        "rounds_failed": len(rounds) - len(done),
        "final_accuracy": done[-1].get("accuracy") if done else None,
        "final_loss": done[-1].get("loss") if done else None,
        "best_accuracy": max(accs) if accs else None,
        "last5_accuracy": _last5(accs),
        "bytes_up": sum(a.link.bytes_up for a in agents),
        "bytes_down": sum(a.link.bytes_down for a in agents),
        "bytes_received_by_aggregator": sum(r["bytes_received"] for r in rounds),
        "epochs": opts.epochs,
        "batch_size": opts.batch_size,
        "lr": opts.lr,
        "mu": opts.mu,
        "codec": opts.codec,
        "gate_threshold": opts.gate_threshold,
        "gate_max_skips": opts.gate_max_skips,
        "uploads": sum(len(r["participants"]) for r in rounds),
        "skips": sum(len(r.get("skipped", [])) for r in rounds),
        "energy_j_per_device_round": _energy(rounds),
        "partition": scheme,
        "strategy": strategy,
        "dataset": str(opts.dataset) if opts.dataset else "digits",
        "seed": opts.seed,
        "runtime": opts.runtime,
        "wall_time_s": round(elapsed, 2),
    }
    base_path = out / "baselines.jsonl"
    if base_path.exists():
        lines = [json.loads(line) for line in base_path.read_text().splitlines()]
        summary["last5_centralised"] = _last5([b["centralised"]["accuracy"] for b in lines])
        summary["last5_non_participant"] = _last5([b["non_participant"]["accuracy"] for b in lines])
        per_device: dict[str, list[float]] = {}
        for b in lines:
            for d, score in b["local"].items():
                per_device.setdefault(d, []).append(score["accuracy"])
        device_means = [m for m in (_last5(v) for v in per_device.values()) if m is not None]
        summary["last5_device_local_median"] = (
            statistics.median(device_means) if device_means else None
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


__all__ = ["SimError", "SimOptions", "bundled_model", "run_sim"]

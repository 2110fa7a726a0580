"""``fedge sim``: an aggregator and N agents on one machine, over a real MQTT broker.

Each agent is the same :class:`fedge.agent.daemon.Agent` a device runs, built from
its own config, with its own MQTT client and its own data partition; only the
threads are shared: by default (``clients="hub"``) every device's connection is driven by
one PahoHub thread and the agents are stepped by a few workers (``fleet.device_pool``);
``clients="threads"`` gives each device paho's network thread and a thread of its own, as
separate processes would have. With no ``--broker`` an embedded amqtt broker is started, for
up to EMBEDDED_MAX_DEVICES devices; above that the sim's own Mosquitto.

One partition scheme writes into ``OUT/``; several (``--partition iid,single``) write
one folder each (``OUT/iid/``, ``OUT/single/``) and an ``OUT/summary.json`` naming them.
A run folder holds ``rounds.jsonl`` (the aggregator's line per round),
``baselines.jsonl`` (centralised, non-participant and device-local scores per round),
``summary.json``, and the partitions and state it generated.

Faults (``fleet.faults``): devices that vanish mid-round (``drop_rate``), a training-time
distribution (``stragglers``), link flaps, restarts of the sim's own Mosquitto
(``broker="mosquitto"``), poisoned devices and hung ones; ``summary.json`` counts them
under ``faults``.
A run whose next round cannot start for a whole round timeout stops there, and says why
under ``stalled``.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from fedge.agent.config import AgentConfig
from fedge.agent.daemon import Agent
from fedge.agent.dataset import Dataset
from fedge.agent.service import build_agent
from fedge.aggregator.config import AggregatorConfig, DownlinkConfig, SecureConfig
from fedge.aggregator.privacy import PrivacyConfig
from fedge.aggregator.service import build_aggregator
from fedge.aggregator.strategies.config import StrategyConfig
from fedge.protocol import GateSettings, TrainingConfig
from fedge.protocol import he as fhe
from fedge.protocol.messages import HE_CODEC
from fedge.protocol.paho_hub import PahoHub
from pydantic import BaseModel, TypeAdapter, ValidationError

from fedge.brokerconfig import broker_link
from fedge.heconfig import AggregatorHeConfig, DeviceHeConfig

from .baselines import LocalModels, Scorer, SoloTrainer
from .datasets import Split, check_split, digits, load_user_dataset
from .device_pool import (
    FDS_PER_DEVICE,
    FDS_SPARE,
    DevicePool,
    FdLimitError,
    raise_fd_limit,
    start_devices,
)
from .embedded_broker import EmbeddedBroker
from .faults import FaultInjector, FaultSettings, FaultSpecError, Ledger, fault_settings
from .fed_eval import aligned, median_gap
from .he_report import DecryptedScores, merge, write_he_keys
from .mosquitto import LocalMosquitto, MosquittoError, find_mosquitto
from .partition import parse_scheme, partition
from .signing_keys import write_signing_pair

if TYPE_CHECKING:
    from fedge.agent.radio import RadioProfile

log = logging.getLogger("fedge.fleet")

# The embedded amqtt broker stopped accepting connections at 300 devices on a 2-core machine
# (bench/README.md, A thousand devices); above this many the sim uses its own Mosquitto.
EMBEDDED_MAX_DEVICES = 200
DEVICE_WORKERS = 8  # threads that step the agents of a hub fleet (fleet.device_pool)


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
    broker: str | None = None  # mqtt://host:port, "mosquitto" (one of its own), None: embedded
    model: Path | None = None  # .tflite, or a spec (.json) to build; default: digits model
    dataset: Path | None = None  # .npz (x, y) or .csv; default: scikit-learn's digits
    label_column: str | None = None  # for a CSV data set
    runtime: str = "litert"
    round_timeout: float = 60.0
    # share of the selected devices whose answers close a round at its deadline
    quorum: float = AggregatorConfig.model_fields["quorum"].default
    fleet: str = "sim"
    strategy: str = "fedadam"
    server_lr: float | None = None
    momentum: float = 0.9
    mu: float = 0.0  # FedProx
    # The fleet's defaults where the lab has none of its own (TrainingConfig holds them).
    codec: str = TrainingConfig.model_fields["codec"].default  # protocol.codecs
    gate_threshold: float = GateSettings().threshold  # ||delta|| / (lr ||w_global||)
    gate_max_skips: int = GateSettings().max_skips
    gate_min_agreement: float | None = None
    max_payload: int = 0  # chunk updates above this many bytes; 0: never
    # Federated evaluation: the share of each device's newest data it scores the global model
    # on before training (and does not train on); 0: off.
    eval_fraction: float = TrainingConfig.model_fields["eval_fraction"].default
    baselines: bool = True
    show_progress: bool = True
    # How the round's deltas are combined (aggregator [strategy]: robust, trim_fraction,
    # norm_bound); the defaults are the plain sample-weighted mean.
    robust: str = "mean"
    trim_fraction: float = 0.2
    norm_bound: float = 0.0
    # Faults (fleet.faults): all off by default.
    drop_rate: float = 0.0
    stragglers: str | None = None  # lognormal:MEAN_S:SIGMA or exp:MEAN_S
    link_flaps: float = 0.0
    broker_restarts: int = 0
    poison: str | None = None  # K:sign-flip or K:scale:F
    hung: int = 0  # devices that stay online and never answer
    # Devices a round selects out of the online fleet (0: all), over-selected by the
    # aggregator's overselect; the round closes once this many have answered.
    devices_per_round: int = AggregatorConfig.model_fields["devices_per_round"].default
    # How many more than devices_per_round a round selects (the aggregator's overselect):
    # spares for stragglers and dropouts; 1.0 for a fleet of reliable quiet devices, where a
    # spare wakes for an answer that comes too late to count.
    overselect: float = AggregatorConfig.model_fields["overselect"].default
    clients: str = "hub"  # hub: connections on one thread (fleet.device_pool); threads: one each
    # Differential privacy (aggregator [privacy], docs/privacy.md): None, "central" or "local".
    dp: str | None = None
    noise_multiplier: float = 1.0
    clip: float = 1.0
    adaptive_clip_quantile: float | None = None
    target_delta: float = 1e-5
    epsilon_budget: float | None = None
    # Secure aggregation (aggregator [secure], docs/secure-aggregation.md): off by default.
    secure: bool = False
    secure_degree: int | None = None  # None: the complete graph
    secure_bits: int = 8
    secure_clip: float = 0.05
    # Compact globals (aggregator [downlink]): the codec of the model deltas; None: whole
    # models every round.
    downlink_codec: str | None = None
    resync_every: int = 100
    # Quiet devices (docs/bandwidth.md): each listens only on its inbox, where the rounds it
    # is selected for come; with rest_rounds, a gate skip also sits that many rounds out.
    quiet: bool = False
    rest_rounds: int = AgentConfig.model_fields["rest_rounds"].default
    # Homomorphic encryption (docs/homomorphic-encryption.md): throwaway CKKS keys; the sim
    # decrypts each round's model outside the aggregator to score it (fleet/he_report.py).
    he: bool = False

    def faults(self) -> FaultSettings:
        try:
            settings = fault_settings(
                drop_rate=self.drop_rate,
                stragglers=self.stragglers,
                link_flaps=self.link_flaps,
                broker_restarts=self.broker_restarts,
                poison=self.poison,
                hung=self.hung,
                devices=self.devices,
                seed=self.seed,
            )
        except FaultSpecError as exc:
            raise SimError(str(exc)) from exc
        if settings.broker_restarts and self.broker != "mosquitto":
            raise SimError(
                "--broker-restarts needs --broker mosquitto (a broker the sim starts, and so"
                " can restart)"
            )
        if settings.poison is not None and self.max_payload:
            raise SimError("--poison cannot be combined with --max-payload (chunked updates)")
        return settings


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
    # Features, label range and finiteness against what the model's signatures say, in one
    # line naming the data set (before any training could fail on it).
    check_split(opts.dataset or Path("digits"), split, path)
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
    opts = _fleet_setup(opts)
    opts.faults()  # refuse bad fault options before any data is loaded
    _strategy_table(opts)
    _training_table(opts)
    _privacy_table(opts)
    _secure_table(opts)
    _downlink_table(opts)
    if opts.rest_rounds and not opts.quiet:
        raise SimError("--rest-rounds needs --quiet (only a quiet device can rest)")
    _check_field(AgentConfig, "rest_rounds", opts.rest_rounds)
    if opts.he:  # TenSEAL before anything loads TensorFlow (a model built from a spec)
        try:
            fhe.tenseal()
        except fhe.HeError as exc:
            raise SimError(str(exc)) from exc
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


def _fleet_setup(opts: SimOptions) -> SimOptions:
    """Check the fleet options, pick Mosquitto for a fleet too big for the embedded broker,
    and make room for every device's socket (a broker the sim starts inherits the limit)."""
    if opts.clients not in FDS_PER_DEVICE:
        raise SimError(f"--clients {opts.clients}: want one of {', '.join(FDS_PER_DEVICE)}")
    if opts.devices_per_round < 0 or opts.devices_per_round > opts.devices:
        raise SimError(
            f"--devices-per-round {opts.devices_per_round}: want 0 (all) to {opts.devices}"
        )
    _check_field(AggregatorConfig, "overselect", opts.overselect)
    if opts.broker is None and opts.devices > EMBEDDED_MAX_DEVICES:
        try:
            find_mosquitto()
        except MosquittoError as exc:
            raise SimError(
                f"{opts.devices} devices are more than the embedded broker holds"
                f" ({EMBEDDED_MAX_DEVICES}): install mosquitto and use --broker mosquitto, or"
                f" pass --broker mqtt://HOST:PORT ({exc})"
            ) from exc
        log.warning(
            "%d devices are more than the embedded broker holds (%d): using --broker mosquitto",
            opts.devices,
            EMBEDDED_MAX_DEVICES,
        )
        opts = replace(opts, broker="mosquitto")
    try:
        raise_fd_limit(opts.devices * FDS_PER_DEVICE[opts.clients] + FDS_SPARE)
    except FdLimitError as exc:
        raise SimError(str(exc)) from exc
    return opts


def _run_with_broker(
    opts: SimOptions, scheme: str, split: Split, model: Path, out: Path, fleet: str
) -> dict[str, Any]:
    """One scheme, on a broker of its own (embedded, or ``mosquitto``) unless ``--broker``
    names one."""
    embedded: EmbeddedBroker | None = None
    mosquitto: LocalMosquitto | None = None
    broker_for: Callable[[str], str]
    if opts.broker is None:
        embedded = EmbeddedBroker().start()
        broker_for = embedded.url_for
        upstream = embedded.url
    elif opts.broker == "mosquitto":
        try:
            # A fresh folder: a retained round signed by last run's key would be refused.
            mosquitto = LocalMosquitto(_fresh_dir(out / "broker")).start()
        except MosquittoError as exc:
            raise SimError(str(exc)) from exc
        upstream = mosquitto.url
        broker_for = _same_for_all(upstream)
    else:
        upstream = opts.broker
        broker_for = _same_for_all(upstream)
    try:
        return _run_one(opts, scheme, split, model, out, fleet, broker_for, upstream, mosquitto)
    finally:
        if embedded is not None:
            embedded.stop()
        if mosquitto is not None:
            mosquitto.stop()


def _check_field(model: type[BaseModel], name: str, value: object) -> None:
    """``value`` against the bounds of config field ``name`` (an option the sim passes on to a
    config it builds later), or a SimError naming the option."""
    field = model.model_fields[name]  # a FieldInfo is Annotated metadata: its bounds apply
    try:
        adapter: TypeAdapter[Any] = TypeAdapter(Annotated[field.annotation, field])  # type: ignore[arg-type]
        adapter.validate_python(value)
    except ValidationError as exc:
        flag = name.replace("_", "-")
        raise SimError(f"--{flag} {value}: {exc.errors()[0]['msg']}") from exc


def _strategy_table(opts: SimOptions) -> StrategyConfig:
    """The aggregator's ``[strategy]`` table, or a SimError naming the bad option."""
    try:
        return StrategyConfig(
            name=opts.strategy,  # type: ignore[arg-type]
            server_lr=opts.server_lr,
            momentum=opts.momentum,
            robust=opts.robust,  # type: ignore[arg-type]
            trim_fraction=opts.trim_fraction,
            norm_bound=opts.norm_bound,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "strategy"
        raise SimError(f"--{where.replace('_', '-')}: {first['msg']}") from exc


def _training_table(opts: SimOptions) -> TrainingConfig:
    """The aggregator's ``[training]`` table, or a SimError naming the bad option."""
    try:
        return TrainingConfig.model_validate(
            {
                "epochs": opts.epochs,
                "batch_size": opts.batch_size,
                "lr": opts.lr,
                "mu": opts.mu,
                "codec": opts.codec,
                "gate": {
                    "threshold": opts.gate_threshold,
                    "min_agreement": opts.gate_min_agreement,
                    "max_skips": opts.gate_max_skips,
                },
                "eval_fraction": opts.eval_fraction,
            }
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "_".join(str(part) for part in first["loc"]) or "training"  # gate_threshold
        raise SimError(f"--{where.replace('_', '-')}: {first['msg']}") from exc


_PRIVACY_FLAGS = {
    "mode": "dp",
    "target_quantile": "adaptive_clip_quantile",
}


def _privacy_table(opts: SimOptions) -> PrivacyConfig | None:
    """The aggregator's ``[privacy]`` table (None without ``--dp``), or a SimError naming the
    bad option."""
    if opts.dp is None:
        return None
    if opts.dp == "local" and opts.adaptive_clip_quantile is not None:
        raise SimError(
            "--adaptive-clip-quantile needs --dp central: under local DP the devices' clip bits"
            " would reach the aggregator without noise"
        )
    try:
        return PrivacyConfig(
            mode=opts.dp,  # type: ignore[arg-type]
            noise_multiplier=opts.noise_multiplier,
            clip=opts.clip,
            target_quantile=opts.adaptive_clip_quantile,
            target_delta=opts.target_delta,
            epsilon_budget=opts.epsilon_budget,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        flag = _PRIVACY_FLAGS.get(where, where) if where else "dp"
        raise SimError(f"--{flag.replace('_', '-')}: {first['msg']}") from exc


def _secure_table(opts: SimOptions) -> SecureConfig | None:
    """The aggregator's ``[secure]`` table (None without ``--secure``), or a SimError naming
    the bad option."""
    if not opts.secure:
        return None
    if opts.devices < 3:
        raise SimError(f"--secure needs at least 3 devices, not {opts.devices}")
    if opts.robust != "mean" or opts.norm_bound:
        raise SimError("--secure needs --robust mean and no --norm-bound: it sees only the sum")
    if opts.poison is not None:
        raise SimError("--secure cannot be combined with --poison (a masked update hides it)")
    try:
        return SecureConfig(
            degree=opts.secure_degree,
            bits=opts.secure_bits,
            clip=opts.secure_clip,
            # One process plays every device here: each key exchange waits its turn.
            stage_timeout=max(15.0, 0.06 * opts.devices),
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "secure"
        raise SimError(f"--secure-{where}: {first['msg']}") from exc


def _downlink_table(opts: SimOptions) -> DownlinkConfig | None:
    """The aggregator's ``[downlink]`` table (None without ``--downlink-codec``)."""
    if opts.downlink_codec is None:
        return None
    try:
        return DownlinkConfig(codec=opts.downlink_codec, resync_every=opts.resync_every)
    except ValidationError as exc:
        first = exc.errors()[0]
        flag = {"codec": "downlink-codec"}.get(str(first["loc"][0]), "resync-every")
        raise SimError(f"--{flag}: {first['msg']}".replace("Value error, ", "")) from exc


def _same_for_all(url: str) -> Callable[[str], str]:
    return lambda client_id: url


def _configs(
    opts: SimOptions,
    scheme: str,
    split: Split,
    model: Path,
    out: Path,
    fleet: str,
    broker_for: Callable[[str], str],
) -> tuple[list[AgentConfig], AggregatorConfig, list[np.ndarray]]:
    data_dir = _fresh_dir(out / "data")
    state_dir = _fresh_dir(out / "state")
    for name in ("rounds.jsonl", "baselines.jsonl", "summary.json"):
        (out / name).unlink(missing_ok=True)

    try:
        parts = partition(scheme, split.y_train, opts.devices, np.random.default_rng(opts.seed))
    except ValueError as exc:
        raise SimError(f"--partition {scheme}: {exc}") from exc
    test = _write_npz(data_dir / "test.npz", split.x_test, split.y_test)
    signing_key, public_key = write_signing_pair(state_dir)
    he_keys = write_he_keys(state_dir) if opts.he else None  # (he.secret, he.public)
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
                he=None if he_keys is None else DeviceHeConfig(key_file=he_keys[0]),
                quiet=opts.quiet,
                rest_rounds=opts.rest_rounds,
            )
        )
    try:
        agg = _aggregator_config(
            opts, fleet, broker_for, signing_key, model, state_dir, test, out, he_keys
        )
    except ValidationError as exc:
        raise SimError(str(exc.errors()[0]["msg"]).removeprefix("Value error, ")) from exc
    return agents, agg, parts


def _aggregator_config(
    opts: SimOptions,
    fleet: str,
    broker_for: Callable[[str], str],
    signing_key: Path,
    model: Path,
    state_dir: Path,
    test: Path,
    out: Path,
    he_keys: tuple[Path, Path] | None = None,
) -> AggregatorConfig:
    return AggregatorConfig(
        fleet=fleet,
        broker=broker_for(f"{fleet}-aggregator"),
        client_id=f"{fleet}-aggregator"[:64],
        signing_key=signing_key,
        model=model,
        state_dir=state_dir,
        rounds=opts.rounds,
        min_devices=opts.devices,
        devices_per_round=opts.devices_per_round,
        overselect=opts.overselect,
        quorum=opts.quorum,
        round_timeout=opts.round_timeout,
        training=_training_table(opts),
        strategy=_strategy_table(opts),
        eval_data=test,
        log=out / "rounds.jsonl",
        seed=opts.seed,
        privacy=_privacy_table(opts),
        secure=_secure_table(opts),
        downlink=_downlink_table(opts),
        he=None if he_keys is None else AggregatorHeConfig(key_file=he_keys[1]),
    )


def _run_one(
    opts: SimOptions,
    scheme: str,
    split: Split,
    model: Path,
    out: Path,
    fleet: str,
    broker_for: Callable[[str], str],
    upstream: str,
    mosquitto: LocalMosquitto | None,
) -> dict[str, Any]:
    from .progress import RoundDisplay

    out.mkdir(parents=True, exist_ok=True)
    agent_cfgs, agg_cfg, parts = _configs(opts, scheme, split, model, out, fleet, broker_for)
    display = RoundDisplay(opts.rounds, enabled=opts.show_progress)
    tracker = (
        _Baselines(opts, split, model, parts, out / "baselines.jsonl") if opts.baselines else None
    )

    decrypted = None
    if opts.he:  # the sim holds the throwaway secret key: it scores E_t for the report
        secret = next(c.he.key_file for c in agent_cfgs if c.he is not None)
        decrypted = DecryptedScores(secret, model, split.x_test, split.y_test, out)

    def on_round(summary: dict[str, Any]) -> None:
        if decrypted is not None and summary["status"] == "done":
            assert aggregator.he is not None
            decrypted.round(summary, aggregator.he.payload)
        extra = None
        if tracker is not None and summary["status"] == "done":
            extra = tracker.round(summary)
        elif tracker is not None:
            tracker.locals.pop(summary["round"])  # a failed round's local models go unscored
        display.round_done(summary, extra)

    stop = threading.Event()
    settings = opts.faults()
    injector = None
    if settings.active:
        injector = FaultInjector(
            settings,
            [cfg.device_id for cfg in agent_cfgs],
            fleet=fleet,
            rounds=opts.rounds,
            round_timeout=opts.round_timeout,
            stop=stop,
            broker=mosquitto,
        ).start(upstream)
    hub = PahoHub().start() if opts.clients == "hub" else None
    try:
        aggregator = build_aggregator(agg_cfg, on_round=on_round)
        agents = [_build_device(cfg, injector, hub) for cfg in agent_cfgs]
    except BaseException:
        if injector is not None:
            injector.close()
        if hub is not None:
            hub.close()
        raise
    if tracker is not None:
        for agent in agents:
            agent.on_trained = tracker.locals.hook(agent.device_id)
    threads: list[threading.Thread] = []
    crashed: list[str] = []

    def serve(agent: Agent) -> None:
        try:
            agent.run(stop)
        except Exception:  # reported once and ends the run: a dead device thread would
            log.exception("agent %s stopped", agent.device_id)  # otherwise stall every round
            crashed.append(agent.device_id)
            stop.set()

    # Stragglers sleep in their link: with faults every device keeps a thread of its own.
    pool = None
    if hub is not None and injector is None:
        pool = DevicePool(
            stop, workers=DEVICE_WORKERS, on_crash=lambda agent: crashed.append(agent.device_id)
        )

    # Failed rounds are announced again: with faults, allow as many again as were asked for.
    budget = opts.round_timeout * ((2 * opts.rounds if injector else opts.rounds) + 2)
    stalled = None
    started = time.perf_counter()
    try:
        aggregator.start()
        if hub is not None:
            # A bounded number at a time; one by one on the embedded amqtt broker, which can
            # fail a connection made while another client subscribes ("dictionary changed
            # size during iteration" in amqtt's broker; the device then reconnects, late).
            embedded = opts.broker is None and mosquitto is None
            start_devices(agents, parallel=1 if embedded else 32)
        else:
            for agent in agents:
                agent.start()
        connect_s = time.perf_counter() - started
        if pool is not None:
            pool.start(agents)
        else:
            for agent in agents:
                t = threading.Thread(target=serve, args=(agent,), name=agent.device_id, daemon=True)
                t.start()
                threads.append(t)
        with display:
            deadline = time.monotonic() + budget
            idle_since = time.monotonic()  # no round open since
            while not aggregator.done and not stop.is_set() and time.monotonic() < deadline:
                aggregator.step(0.1)
                current = aggregator.current
                if current is not None:
                    idle_since = time.monotonic()
                    if injector is not None:
                        injector.watch(
                            current.round_id, len(current.answered), len(current.selected)
                        )
                elif time.monotonic() - idle_since > opts.round_timeout:
                    # Every device runs here: a round that cannot start for a whole round
                    # timeout never will. Say so now instead of waiting out the budget.
                    away = sorted({a.device_id for a in agents} - aggregator.online)
                    more = f" and {len(away) - 10} more" if len(away) > 10 else ""
                    stalled = (
                        f"round {aggregator.next_round_id} could not start in"
                        f" {opts.round_timeout:g} s: {len(aggregator.online)} of the"
                        f" {agg_cfg.min_devices} devices it needs are online"
                        f" (not heard from: {', '.join(away[:10]) or 'none'}{more})"
                    )
                    log.warning("run stopped: %s", stalled)
                    break
    finally:
        stop.set()
        if injector is not None:
            injector.stop_timers()
        for t in threads:
            t.join(30)
        if pool is not None:
            pool.join()
        for agent in agents:
            try:
                agent.stop()
            except Exception as exc:  # one device failing to say goodbye must not skip the rest
                log.warning("agent %s did not stop cleanly: %s", agent.device_id, exc)
        aggregator.link.close()
        aggregator.store.close()
        if hub is not None:
            hub.close()
        if injector is not None:
            injector.close()
    if crashed:
        raise SimError(f"agent(s) {', '.join(crashed)} crashed; see the log above")
    if injector is not None and injector.errors:
        raise SimError(f"fault injection failed: {injector.errors[0]}")
    elapsed = time.perf_counter() - started
    summary = _summarise(
        opts,
        scheme,
        out,
        agents,
        aggregator.strategy.describe(),
        elapsed,
        injector.ledger if injector is not None else None,
        stalled,
        connect_s,
        aggregator.budget_stop,
    )
    display.fed_eval_line(summary)
    return summary


def _build_device(cfg: AgentConfig, injector: FaultInjector | None, hub: PahoHub | None) -> Agent:
    """The device of ``cfg`` (its link on ``hub`` if given); with faults, on a link that
    injects them."""
    will = Agent.will(cfg.device_id, cfg.fleet)
    birth = Agent.birth(cfg.device_id, cfg.fleet, quiet=cfg.quiet)
    if injector is None:
        return build_agent(
            cfg, link=broker_link(cfg.broker, cfg.device_id, cfg.tls, will, birth, hub=hub)
        )
    url = injector.device_url(cfg.device_id, cfg.broker)
    inner = broker_link(url, cfg.device_id, cfg.tls, will, birth, hub=hub)
    link = injector.wrap(inner, cfg.device_id)
    agent = build_agent(cfg, link=link)
    link.shapes = {name: list(w.shape) for name, w in agent.runtime.get_weights().items()}
    return agent


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


def round_energy(r: dict[str, Any], profile: RadioProfile) -> list[float]:
    """The radio energy (J) of each online device in one round record.

    A selected device receives the announcement and the global model and answers (update or
    skip notice) within one radio wake: local training here takes well under the LTE tail
    of about 11.6 s. A device online but not selected wakes too when it listens to every
    round (it receives the announcement and the model); a quiet one (its inbox got nothing)
    spends nothing. See fedge.agent.radio for the model and its sources.
    """
    from fedge.agent.radio import estimate

    down = r.get("bytes_down_per_device", 0)
    by_device = r.get("bytes_down_by_device", {})
    up = r.get("bytes_up_by_device", {})
    selected = r.get("participants", []) + r.get("skipped", []) + r.get("missing", [])
    joules = [estimate(profile, up.get(d, 0), by_device.get(d, down)).joules for d in selected]
    joules += [estimate(profile, 0, down).joules] * r.get("listening", 0)
    return joules + [0.0] * r.get("sleeping", 0)


def _energy(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Mean radio energy per online device per round, by link profile (``round_energy``)."""
    from fedge.agent.radio import PROFILES

    out: dict[str, float] = {}
    for name, profile in PROFILES.items():
        joules = [j for r in rounds for j in round_energy(r, profile)]
        out[name] = round(float(np.mean(joules)), 4) if joules else 0.0
    return out


def _last5(values: list[float]) -> float | None:
    return float(np.mean(values[-5:])) if values else None


def _fed_eval_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The devices' own scores (federated evaluation) against the held-out accuracy of the
    same model versions (``fleet.fed_eval``): the median absolute gap over the rounds that
    have both, and the devices' accuracy over the last five."""
    points = aligned(rounds, "accuracy")
    return {
        "last5_fed_eval_accuracy": _last5([p.federated for p in points]),
        "fed_eval_gap": median_gap(points),
        "fed_eval_compared": sum(p.central is not None for p in points),
    }


def _privacy_summary(
    opts: SimOptions, rounds: list[dict[str, Any]], budget_stop: str | None
) -> dict[str, Any]:
    """The run's differential privacy: the settings, and epsilon after its last round."""
    spent = [r["privacy"] for r in rounds if "privacy" in r]
    out: dict[str, Any] = {
        "mode": opts.dp,
        "noise_multiplier": opts.noise_multiplier,
        "clip": opts.clip,
        "adaptive_clip_quantile": opts.adaptive_clip_quantile,
        "target_delta": opts.target_delta,
        "epsilon_budget": opts.epsilon_budget,
        "epsilon": spent[-1]["epsilon"] if spent else 0.0,
        "rounds_accounted": spent[-1]["rounds_accounted"] if spent else 0,
        "final_clip": spent[-1].get("next_clip", spent[-1]["clip"]) if spent else opts.clip,
    }
    if budget_stop is not None:
        out["budget_stop"] = budget_stop
    return out


def _summarise(
    opts: SimOptions,
    scheme: str,
    out: Path,
    agents: list,
    strategy: str,
    elapsed: float,
    faults: Ledger | None = None,
    stalled: str | None = None,
    connect_s: float | None = None,
    budget_stop: str | None = None,
) -> dict[str, Any]:
    log_path = out / "rounds.jsonl"
    rounds = (
        [json.loads(line) for line in log_path.read_text().splitlines()]
        if log_path.exists()
        else []
    )
    merge(out, rounds)  # under HE: the scores the sim decrypted (fleet/he_report.py)
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
        **_fed_eval_summary(rounds),
        "bytes_up": sum(a.link.bytes_up for a in agents),
        "bytes_down": sum(a.link.bytes_down for a in agents),
        "bytes_received_by_aggregator": sum(r["bytes_received"] for r in rounds),
        "epochs": opts.epochs,
        "batch_size": opts.batch_size,
        "lr": opts.lr,
        "mu": opts.mu,
        "codec": HE_CODEC if opts.he else opts.codec,
        "gate_threshold": opts.gate_threshold,
        "gate_max_skips": opts.gate_max_skips,
        "uploads": sum(len(r["participants"]) for r in rounds),
        "skips": sum(len(r.get("skipped", [])) for r in rounds),
        "energy_j_per_device_round": _energy(rounds),
        "partition": scheme,
        "strategy": strategy,
        "robust": opts.robust,
        "trim_fraction": opts.trim_fraction,
        "norm_bound": opts.norm_bound,
        "dataset": str(opts.dataset) if opts.dataset else "digits",
        "seed": opts.seed,
        "runtime": opts.runtime,
        "wall_time_s": round(elapsed, 2),
        "clients": opts.clients,
        "devices_per_round": opts.devices_per_round,
        "overselect": opts.overselect,
        "connect_s": None if connect_s is None else round(connect_s, 2),
    }
    if stalled is not None:
        summary["stalled"] = stalled
    if opts.dp is not None:
        summary["privacy"] = _privacy_summary(opts, rounds, budget_stop)
    if opts.secure:
        summary["secure"] = {
            "degree": opts.secure_degree,
            "bits": opts.secure_bits,
            "clip": opts.secure_clip,
            "survivors": [r.get("secure", {}).get("survivors") for r in rounds],
        }
    if opts.he:
        summary["he"] = {"accuracy_from": "the sim, decrypting each model outside the aggregator"}
    if faults is not None:
        summary["faults"] = faults.summary(rounds)
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

"""The ``fedge`` command. Subcommands import their room lazily, so ``fedge agent``
never loads TensorFlow, scikit-learn, matplotlib or anything in ``fleet``.

Every expected failure ends as one ``fedge: error:`` line on stderr: an invalid config
with exit status 78 (EX_CONFIG, one line per problem), anything else (missing model, bad
data, an unreachable broker) with 2. A traceback means a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: `fedge agent` never loads the sim
    from fedge.fleet.sim import SimOptions


class UserError(Exception):
    """An error whose message is all the user needs (exit status 2)."""


def _expected_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that end as one ``fedge: error:`` line instead of a traceback.

    Looked up among the modules already loaded, never imported here: an exception can
    only have been raised by a module that was imported, and importing one now (on a
    device without LiteRT, say) could fail and bury the real error under a second one.
    """
    wanted = (
        ("fedge.configfile", "ConfigError"),
        ("fedge.models.runtime", "RuntimeError_"),
        ("fedge.models.spec", "SpecError"),
        ("fedge.models.tflite_schema", "ModelFileError"),
        ("fedge.agent.dataset", "DatasetError"),
        # A broker that cannot be reached or refuses us: systemd restarts the service.
        ("fedge.protocol.errors", "LinkError"),
    )
    errors: list[type[BaseException]] = [UserError]
    for module_name, name in wanted:
        module = sys.modules.get(module_name)
        if module is not None:
            errors.append(getattr(module, name))
    return tuple(errors)


def _state_errors() -> tuple[type[BaseException], ...]:
    """State that cannot be used as it is (exit 78, like a bad config: restarting would
    not help)."""
    found = []
    for module_name, name in (
        ("fedge.aggregator.store", "StoreError"),
        ("fedge.agent.state", "StateCorrupt"),
    ):
        module = sys.modules.get(module_name)
        if module is not None:
            found.append(getattr(module, name))
    return tuple(found)


def _cmd_agent(args: argparse.Namespace) -> int:
    import os

    # One BLAS thread, as systemd/fedge-agent.service sets: set before numpy is imported, and
    # a value the user exported wins. An agent's arrays are too small for BLAS threads, which
    # would only be idle threads (one per core) in every agent process.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    from fedge.agent.config import AgentConfig
    from fedge.agent.service import serve
    from fedge.configfile import load_config

    return serve(load_config(args.config, AgentConfig), reset=args.reset_state)


def _cmd_aggregator(args: argparse.Namespace) -> int:
    from fedge.aggregator.config import AggregatorConfig
    from fedge.aggregator.service import serve
    from fedge.configfile import load_config

    cfg = load_config(args.config, AggregatorConfig)
    if args.worker is not None:
        from fedge.aggregator.shard_service import serve_worker
        from fedge.configfile import ConfigError

        if args.reset_state:
            raise ConfigError(["--reset-state is for the coordinator, not a --worker"])

        return serve_worker(cfg, args.worker)
    return serve(cfg, reset=args.reset_state)


def _cmd_models_build(args: argparse.Namespace) -> int:
    from fedge.models.builder import BuildError, build_file
    from fedge.models.spec import load_spec

    spec = load_spec(args.spec)
    try:
        out = build_file(spec, args.output)
    except BuildError as exc:
        raise UserError(str(exc)) from exc
    print(f"wrote {out} ({out.stat().st_size} bytes, {spec.parameter_count()} parameters)")
    return 0


def _cmd_models_inspect(args: argparse.Namespace) -> int:
    from fedge.models.metadata import op_codes
    from fedge.models.runtime import load_runtime, read_model

    data = read_model(args.model)
    rt = load_runtime(data)
    weights = rt.get_weights()
    print(f"{args.model}: {len(data)} bytes, runtime {rt.describe()}")
    for name, w in weights.items():
        print(f"  {name:24s} {tuple(w.shape)}")
    print("  ops: " + ", ".join(sorted({o.custom_code or o.builtin for o in op_codes(data)})))
    return 0


def _sim_options(args: argparse.Namespace) -> SimOptions:
    """``fedge sim``'s options as the sim's own (with no option given: ``SimOptions()``, which
    a test holds equal, so that a default lives in the dataclass and in argparse alike)."""
    from fedge.fleet.sim import SimOptions

    return SimOptions(
        devices=args.devices,
        rounds=args.rounds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        partition=args.partition,
        seed=args.seed,
        out=Path(args.out),
        broker=args.broker,
        model=Path(args.model) if args.model else None,
        dataset=Path(args.dataset) if args.dataset else None,
        label_column=args.label_column,
        runtime=args.runtime,
        round_timeout=args.round_timeout,
        quorum=args.quorum,
        strategy=args.strategy or ("fedavg" if args.he else "fedadam"),
        server_lr=args.server_lr,
        momentum=args.momentum,
        mu=args.mu,
        codec=args.codec,
        gate_threshold=args.gate_threshold,
        gate_max_skips=args.gate_max_skips,
        gate_min_agreement=args.gate_min_agreement,
        max_payload=args.max_payload,
        eval_fraction=args.eval_fraction,
        baselines=not args.no_baselines,
        robust=args.robust,
        trim_fraction=args.trim_fraction,
        norm_bound=args.norm_bound,
        drop_rate=args.drop_rate,
        stragglers=args.stragglers,
        link_flaps=args.link_flaps,
        broker_restarts=args.broker_restarts,
        poison=args.poison,
        hung=args.hung,
        devices_per_round=args.devices_per_round,
        overselect=args.overselect,
        clients=args.clients,
        dp=args.dp,
        noise_multiplier=args.noise_multiplier,
        clip=args.clip,
        adaptive_clip_quantile=args.adaptive_clip_quantile,
        target_delta=args.target_delta,
        epsilon_budget=args.epsilon_budget,
        secure=args.secure,
        secure_degree=args.secure_degree,
        secure_bits=args.secure_bits,
        secure_clip=args.secure_clip,
        downlink_codec=args.downlink_codec,
        resync_every=args.resync_every,
        quiet=args.quiet,
        rest_rounds=args.rest_rounds,
        he=args.he,
    )


def _cmd_sim(args: argparse.Namespace) -> int:
    from fedge.fleet.datasets import DatasetError  # fedge.fleet caps BLAS threads first
    from fedge.fleet.sim import SimError, run_sim

    if args.scenario == "maintenance":
        given: set[str] = getattr(args, "given", set())
        args.devices = args.devices if "devices" in given else 20
        args.rounds = args.rounds if "rounds" in given else 30
        return _sim_maintenance(args)

    opts = _sim_options(args)
    if args.source == "serial":
        return _sim_serial(args)
    try:
        summary = run_sim(opts)
    except (SimError, DatasetError) as exc:
        raise UserError(str(exc)) from exc
    runs = summary["schemes"].values() if "schemes" in summary else [summary]
    complete = all(
        run["rounds_completed"] == args.rounds or "budget_stop" in run.get("privacy", {})
        for run in runs
    )
    for run in runs:
        if "privacy" in run:
            dp = run["privacy"]
            print(
                f"differential privacy ({dp['mode']}): epsilon {dp['epsilon']:.3f} at delta"
                f" {dp['target_delta']:g} after {dp['rounds_accounted']} round(s)"
            )
            if "budget_stop" in dp:
                print(f"stopped at the privacy budget: {dp['budget_stop']}")
    print(f"results in {opts.out}/ (render them with: fedge report {opts.out})")
    return 0 if complete else 1


@contextlib.contextmanager
def _sim_broker(url: str | None) -> Iterator[tuple[str, Callable[[str], str] | None]]:
    """The broker a sim runs on: ``url``, or an embedded one for the run (its URL, and how
    each client reaches it)."""
    if url:
        yield url, None
        return
    from fedge.fleet.embedded_broker import EmbeddedBroker

    embedded = EmbeddedBroker().start()
    try:
        yield embedded.url, embedded.url_for
    finally:
        embedded.stop()


def _sim_serial(args: argparse.Namespace) -> int:
    from fedge.fleet.sensor_fleet import run_sensor_fleet

    out = Path(args.out)
    with _sim_broker(args.broker) as (broker, broker_for):
        summary = run_sensor_fleet(
            devices=args.devices,
            rounds=args.rounds,
            broker=broker,
            broker_for=broker_for,
            out=out,
            seed=args.seed,
            round_timeout=args.round_timeout,
        )
    print(
        f"{summary['devices']} devices read {summary['samples_read']} samples over their serial"
        f" ports; held-out forecast loss {summary['first_round_loss']:.4f} after round 1,"
        f" {summary['final_loss']:.4f} after round {summary['rounds_completed']}"
        f" (predicting the last value: {summary['last_value_baseline_loss']:.4f}); see {out}/"
    )
    return 0 if summary["rounds_completed"] == args.rounds else 1


def _sim_maintenance(args: argparse.Namespace) -> int:
    from fedge.fleet.maintenance_policies import Costs
    from fedge.fleet.maintenance_run import cost_table, run_maintenance
    from fedge.fleet.pump_fleet import FleetError

    out = Path(args.out)
    costs = Costs(
        planned=args.planned_cost,
        unplanned_factor=args.unplanned_factor,
        downtime_per_day=args.downtime_per_day,
        outage_days=args.outage_days,
    )
    try:
        with _sim_broker(args.broker) as (broker, broker_for):
            summary = run_maintenance(
                machines=args.devices,
                rounds=args.rounds,
                broker=broker,
                broker_for=broker_for,
                out=out,
                seed=args.seed,
                round_timeout=args.round_timeout,
                horizon=args.horizon,
                threshold=args.threshold,
                confirm=args.confirm,
                schedule_quantile=args.schedule_quantile,
                costs=costs,
            )
    except FleetError as exc:
        raise UserError(str(exc)) from exc
    first = summary["first_failure_of_never_failed"]
    print(
        f"{summary['machines']} pumps, {summary['rounds_completed']} rounds,"
        f" {summary['future_lives']} future pump lives scored"
        f" ({len(summary['never_failed'])} machines had never failed)"
    )
    print(cost_table(summary))
    if first:
        print(
            "first failure of a machine that never failed before, caught in time: "
            + ", ".join(f"{k} {v['caught_in_time']}/{v['lives']}" for k, v in first.items())
        )
    print(f"{summary['seconds']['total']:.0f} s; results and maintenance.png in {out}/")
    return 0 if summary["rounds_completed"] == args.rounds else 1


def _cmd_report(args: argparse.Namespace) -> int:
    from fedge.fleet.report import ReportError, load_runs, privacy_spent, render_report

    try:
        png, html = render_report(
            Path(args.run_dir),
            png=Path(args.png) if args.png else None,
            html=Path(args.html) if args.html else None,
        )
        for run in load_runs(Path(args.run_dir)):
            if (spent := privacy_spent(run)) is not None:
                print(f"{run.scheme}: differential privacy, {spent}")
    except ReportError as exc:
        raise UserError(str(exc)) from exc
    print(f"wrote {png} and {html}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from fedge.status import load, run

    cfg = load(Path(args.config) if args.config else None, args.broker, args.fleet)
    return run(
        cfg,
        wait=args.wait,
        watch=args.interval if args.watch else None,
        json_out=args.json,
        legend=args.legend,
    )


def _cmd_fleet_launch(args: argparse.Namespace) -> int:
    from fedge.fleet.launch import LaunchError, LaunchOptions, launch, print_outcome

    opts = LaunchOptions(
        devices=args.devices,
        rounds=args.rounds,
        partition=args.partition,
        seed=args.seed,
        round_timeout=args.round_timeout,
        out=Path(args.out),
        broker=args.broker,
        hang=args.hang,
        model=Path(args.model) if args.model else None,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        agents_per_process=args.agents_per_process,
    )
    try:
        result = launch(opts)
    except LaunchError as exc:
        raise UserError(str(exc)) from exc
    return print_outcome(result, opts.rounds)


def _cmd_bridge_simulate(args: argparse.Namespace) -> int:
    import os
    import signal
    import threading

    from fedge.firmware_bridge.binary_frames import encode_frame
    from fedge.firmware_bridge.simulator import Machine, open_pty, replay_csv, serve_pty
    from fedge.firmware_bridge.text_frames import format_line

    if args.replay and not Path(args.replay).is_file():
        raise UserError(f"{args.replay}: no such file")
    master, path = open_pty(Path(args.link) if args.link else None)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if args.replay:
        samples: Any = replay_csv(Path(args.replay))
    elif args.machine == "pump":
        samples = _pump_samples(args.seed, args.hours)
    else:
        samples = Machine(seed=args.seed, rate_hz=args.rate, fault_rate=args.fault_rate).samples()
    encode = encode_frame if args.format == "binary" else format_line
    print(f"simulated sensor on {path} ({args.format} frames at {args.rate:g} Hz)", flush=True)
    limit = int(args.seconds * args.rate) if args.seconds else None
    try:
        sent = serve_pty(master, samples, encode, rate_hz=args.rate, stop=stop, limit=limit)
    except KeyboardInterrupt:
        sent = -1
    finally:
        os.close(master)
        if args.link:
            Path(args.link).unlink(missing_ok=True)
    if sent >= 0:
        print(f"sent {sent} samples")
    return 0


def _pump_samples(seed: int, hours: float) -> Any:
    """One progpy pump, run to failure and replaced for ``hours`` of pump time (a reading a
    minute), as its MCU's frames: the maintenance fleet's machine, alone."""
    import numpy as np

    from fedge.fleet.pump_fleet import FleetError, draw_profiles, frames, simulate_fleet

    rng = np.random.default_rng(seed)
    try:
        run = simulate_fleet(draw_profiles(1, rng), hours * 3600.0, rng=rng, reading_s=60.0)[0]
    except FleetError as exc:
        raise UserError(str(exc)) from exc
    print(f"pump: {len(run.readings)} readings, failures at readings {run.failures}", flush=True)
    return frames(run.readings, 60.0)


def _cmd_provision(args: argparse.Namespace) -> int:
    from fedge.provision import (
        DEFAULT_SERVER_NAMES,
        ProvisionError,
        init_fleet,
        init_he_keys,
        provision_device,
        read_registry,
        revoke_device,
    )

    pki = Path(args.dir)
    warning = ""
    try:
        if args.he and (args.device_id or args.revoke):
            raise UserError("--he makes the fleet's HE keys: use it with --init, or alone")
        if args.he:
            from fedge.protocol import he

            try:
                he.tenseal()  # before anything is written: one line if TenSEAL is missing
            except he.HeError as exc:
                raise UserError(str(exc)) from exc
        if args.he and not args.init:
            changes = init_he_keys(pki, force=args.force)
            done = (
                "HE keys: he.public is for the aggregator; device bundles made from now on"
                " carry he.secret (re-provision devices made before)"
            )
        elif args.init:
            if args.device_id or args.revoke or not args.fleet:
                raise UserError("use: fedge provision --init --fleet FLEET [--dir PKI]")
            names = args.server_names or list(DEFAULT_SERVER_NAMES)
            if not args.server_names:
                warning = (
                    f"the broker certificate names only {' and '.join(names)}; devices on"
                    " other machines need --init --server-name BROKER_HOST"
                )
            changes = init_fleet(pki, args.fleet, names, args.days, force=args.force)
            done = f"fleet {args.fleet}: a CA, and a broker certificate for {', '.join(names)}"
            if args.he:  # a new fleet: new HE keys, whatever was there
                changes += init_he_keys(pki, force=True)
                done += "; HE keys (he.public for the aggregator, he.secret in device bundles)"
        elif not args.device_id:
            raise UserError("give a DEVICE_ID to provision or --revoke, or --init for a new fleet")
        elif args.revoke:
            changes = revoke_device(pki, args.device_id)
            done = (
                f"revoked {args.device_id}: copy ca.crl, fedge.acl and passwd to the broker,"
                " then reload it (systemctl reload mosquitto)"
                if changes
                else f"{args.device_id} was already revoked; nothing changed"
            )
        else:
            changes = provision_device(
                pki,
                args.device_id,
                args.fleet or read_registry(pki)["fleet"],
                force=args.force,
                password=args.password,
                gateway=args.gateway,
                site_gateway=args.site_gateway,
                operator=args.operator,
                site=args.site,
                server_names=args.server_names or (),
                model=args.model,
                data=args.data,
                serial_port=args.serial,
                task=args.task,
                max_samples=args.max_samples,
                broker_host=args.broker_host,
                days=args.days,
            )
            bundle = pki / "devices" / args.device_id
            if args.site_gateway and not args.server_names:
                names = " and ".join(DEFAULT_SERVER_NAMES)
                warning = (
                    f"the site broker's certificate names only {names}; its devices on other"
                    " machines need --site-gateway --server-name SITE_BROKER_HOST"
                )
            if args.site_gateway:
                done = (
                    f"site gateway {args.device_id}: install {pki / 'sites' / args.device_id}/ as"
                    f" its broker's files and {bundle}/ as its worker (docs/scale.md); copy"
                    " fedge.acl to the central broker, then reload it"
                )
            else:
                broker = f"site {args.site}'s broker" if args.site else "the broker"
                done = (
                    f"{args.device_id}: copy {bundle}/ to the device; copy fedge.acl and passwd"
                    f" to {broker}, then reload it"
                )
    except ProvisionError as exc:
        raise UserError(str(exc)) from exc
    for change in changes:
        print(change)
    print(done)
    if warning:
        print(f"fedge: warning: {warning}", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedge", description=__doc__.splitlines()[0], formatter_class=HelpWithDefaults
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("--version", action="version", version=f"fedge {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("agent", help="run the device daemon")
    a.add_argument("--config", required=True, help="agent config (TOML)")
    a.add_argument(
        "--reset-state",
        action="store_true",
        help="move the state file aside and start afresh (prefer restoring its .bak)",
    )
    a.set_defaults(func=_cmd_agent, log_level=logging.INFO)

    g = sub.add_parser("aggregator", help="run the round coordinator")
    g.add_argument("--config", required=True, help="aggregator config (TOML)")
    g.add_argument(
        "--reset-state",
        action="store_true",
        help="move the state database aside and start afresh from the config's model,"
        " numbering rounds and versions on from rounds.jsonl (prefer restoring the backup)",
    )
    g.add_argument(
        "--worker",
        metavar="NAME",
        help="run shard worker NAME of the config's [shards] instead of the coordinator"
        " (docs/scale.md)",
    )
    g.set_defaults(func=_cmd_aggregator, log_level=logging.INFO)

    m = sub.add_parser("models", help="build and inspect models").add_subparsers(
        dest="models_command", required=True
    )
    b = m.add_parser("build", help="build a .tflite from a spec (needs fedge[build])")
    b.add_argument("spec")
    b.add_argument("-o", "--output", required=True)
    b.set_defaults(func=_cmd_models_build, log_level=logging.WARNING)
    i = m.add_parser("inspect", help="show a model's weights, ops and runtime")
    i.add_argument("model")
    i.set_defaults(func=_cmd_models_inspect, log_level=logging.WARNING)

    s = sub.add_parser("sim", help="run a simulated fleet on this machine (needs fedge[sim])")
    s.add_argument(
        "--scenario",
        choices=["learn", "maintenance"],
        default="learn",
        help="learn: train a model on a data set (the default); maintenance: a fleet of pumps"
        " (NASA progpy, needs fedge[maintenance]) that wear out and fail, read over serial"
        " ports; scores federated failure warnings against each device alone, a centralised"
        " model and a fixed schedule (its own setup: E=2, lr 0.1, FedAvg)",
    )
    s.add_argument(
        "--devices", type=int, default=10, action=_Given, help="maintenance: 20 unless given"
    )
    s.add_argument(
        "--devices-per-round",
        type=int,
        default=0,
        help="devices a round needs answers from, selected out of the online fleet (0: all)",
    )
    s.add_argument(
        "--overselect",
        type=float,
        default=1.3,
        help="with --devices-per-round: select this many times more, as spares (1: none;"
        " for reliable quiet devices, a spare wakes for nothing)",
    )
    s.add_argument(
        "--clients",
        default="hub",
        choices=["hub", "threads"],
        help="hub: every device's MQTT connection on one thread (scales to 1000s);"
        " threads: a network thread per device",
    )
    s.add_argument(
        "--rounds", type=int, default=20, action=_Given, help="maintenance: 30 unless given"
    )
    s.add_argument("--epochs", type=int, default=5, help="local epochs per round")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--lr", type=float, default=0.1, help="local learning rate")
    s.add_argument(
        "--partition",
        default="iid",
        help="iid, dominant:P, single, dirichlet:ALPHA; several separated by commas",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="runs/sim", help="output folder")
    s.add_argument(
        "--broker",
        default=None,
        help="mqtt://host:port, or mosquitto: start one on a free port (default: embedded broker)",
    )
    s.add_argument(
        "--model", default=None, help="FILE.tflite or a spec .json (default: the digits model)"
    )
    s.add_argument("--dataset", default=None, help="your data: .npz (x, y) or .csv")
    s.add_argument(
        "--source",
        choices=["file", "serial"],
        default="file",
        help="serial: every agent reads its own simulated machine over a pty and trains the"
        " bundled forecaster (its own setup: E=2, lr 0.05, FedAvg; uses --devices, --rounds,"
        " --seed, --out, --broker and --round-timeout only)",
    )
    s.add_argument("--label-column", default=None, help="label column of a CSV data set")
    s.add_argument(
        "--strategy",
        default=None,
        choices=["fedavg", "fedavgm", "fedadam"],
        help="server strategy (default: fedadam; fedavg with --he)",
    )
    s.add_argument("--server-lr", type=float, default=None, help="server step (strategy default)")
    s.add_argument("--momentum", type=float, default=0.9, help="FedAvgM server momentum")
    s.add_argument("--mu", type=float, default=0.0, help="FedProx proximal weight (0: off)")
    s.add_argument("--codec", default="topk:0.02+int8", help="float32, float16, int8, topk:F+int8")
    s.add_argument(
        "--gate-threshold", type=float, default=0.1, help="skip below ||delta||/(lr ||w||); 0: off"
    )
    s.add_argument("--gate-max-skips", type=int, default=2, help="upload at least every N+1")
    s.add_argument("--gate-min-agreement", type=float, default=None, help="CMFL relevance")
    s.add_argument("--max-payload", type=int, default=0, help="chunk updates above N bytes")
    s.add_argument(
        "--eval-fraction",
        type=float,
        default=0.1,
        help="share of each device's newest data it scores the global model on, not trains on",
    )
    s.add_argument(
        "--no-baselines", action="store_true", help="skip centralised/non-participant/local scores"
    )
    s.add_argument("--runtime", default="litert", choices=["litert", "tflite_runtime", "numpy"])
    s.add_argument("--round-timeout", type=float, default=60.0, help="seconds")
    s.add_argument(
        "--quorum",
        type=float,
        default=0.5,
        help="share of the selected devices whose answers close a round at its deadline",
    )
    s.add_argument(
        "--robust",
        default="mean",
        choices=["mean", "median", "trimmed_mean"],
        help="how the round's deltas are combined",
    )
    s.add_argument(
        "--trim-fraction", type=float, default=0.2, help="trimmed_mean: share cut at each end"
    )
    s.add_argument(
        "--norm-bound",
        type=float,
        default=0.0,
        help="scale each delta to at most this many times the round's median norm; 0: off",
    )
    dp = s.add_argument_group("differential privacy (docs/privacy.md; off by default)")
    dp.add_argument(
        "--dp",
        choices=("central", "local"),
        default=None,
        help="central: the aggregator adds noise to the sum; local: each device to its update",
    )
    dp.add_argument(
        "--noise-multiplier", type=float, default=1.0, help="z: noise std = z x clip (with --dp)"
    )
    dp.add_argument("--clip", type=float, default=1.0, help="L2 bound C on each update (initial)")
    dp.add_argument(
        "--adaptive-clip-quantile",
        type=float,
        default=None,
        metavar="Q",
        help="central DP: move the clip toward this quantile of the update norms",
    )
    dp.add_argument(
        "--target-delta", type=float, default=1e-5, help="epsilon is reported at this delta"
    )
    dp.add_argument(
        "--epsilon-budget",
        type=float,
        default=None,
        help="stop before a round would take epsilon past this",
    )
    dl = s.add_argument_group("compact globals (docs/bandwidth.md; off by default)")
    dl.add_argument(
        "--downlink-codec",
        default=None,
        metavar="CODEC",
        help="send each new global model as a delta in this codec, e.g. topk:0.1+int8",
    )
    dl.add_argument(
        "--resync-every",
        type=int,
        default=100,
        help="with --downlink-codec: the whole model every this many versions (default 100)",
    )
    s.add_argument(
        "--quiet",
        action="store_true",
        help="quiet devices: each hears only the rounds it is selected for, in its inbox"
        " (docs/bandwidth.md)",
    )
    s.add_argument(
        "--rest-rounds",
        type=int,
        default=0,
        metavar="N",
        help="with --quiet: a device whose gate holds its update back sits the next N rounds"
        " out without a word (default 0)",
    )
    sa = s.add_argument_group("secure aggregation (docs/secure-aggregation.md; off by default)")
    sa.add_argument(
        "--secure",
        action="store_true",
        help="devices mask their updates; the aggregator sees only the sum (Bonawitz et al.)",
    )
    sa.add_argument(
        "--secure-degree",
        type=int,
        default=None,
        metavar="K",
        help="neighbours per device (even; SecAgg+); default: every device (complete graph)",
    )
    sa.add_argument(
        "--secure-bits", type=int, default=8, help="quantisation bits per entry (default 8)"
    )
    sa.add_argument(
        "--secure-clip",
        type=float,
        default=0.05,
        help="each entry is clipped to [-clip, clip] before quantising (default 0.05)",
    )
    s.add_argument(
        "--he",
        action="store_true",
        help="homomorphic encryption (docs/homomorphic-encryption.md): throwaway CKKS keys,"
        " encrypted updates and model; the sim decrypts each model to score it",
    )
    f = s.add_argument_group("faults (seeded by --seed; counted in summary.json)")
    f.add_argument(
        "--drop-rate",
        type=float,
        default=0.0,
        help="per selected device and round: it trains, its answer never arrives",
    )
    f.add_argument(
        "--stragglers",
        default=None,
        metavar="SPEC",
        help="training time: lognormal:MEAN_S:SIGMA or exp:MEAN_S; late is a dropout",
    )
    f.add_argument(
        "--link-flaps",
        type=float,
        default=0.0,
        metavar="RATE",
        help="per device and round: its connection is cut once at a random moment",
    )
    f.add_argument(
        "--broker-restarts",
        type=int,
        default=0,
        metavar="N",
        help="restart the broker N times (needs --broker mosquitto)",
    )
    f.add_argument(
        "--poison",
        default=None,
        metavar="K:MODE",
        help="K devices send poisoned updates: K:sign-flip or K:scale:F",
    )
    f.add_argument(
        "--hung",
        type=int,
        default=0,
        metavar="K",
        help="K devices stay connected and online and never answer",
    )
    mt = s.add_argument_group("--scenario maintenance (costs in any currency)")
    mt.add_argument("--horizon", type=int, default=90, help="warn of a failure within N minutes")
    mt.add_argument("--threshold", type=float, default=0.5, help="P(failure) that warns")
    mt.add_argument("--confirm", type=int, default=3, help="readings in a row above it")
    mt.add_argument("--planned-cost", type=float, default=1000.0, help="C: a planned replacement")
    mt.add_argument("--unplanned-factor", type=float, default=5.0, help="k: a failure costs k * C")
    mt.add_argument("--downtime-per-day", type=float, default=2000.0, help="D: a day stopped")
    mt.add_argument("--outage-days", type=float, default=1.0, help="days a failure stops it")
    mt.add_argument(
        "--schedule-quantile",
        type=float,
        default=0.1,
        help="fixed schedule: replace at the age this share of the fleet's lives fell short of",
    )
    s.set_defaults(func=_cmd_sim, log_level=logging.WARNING)

    br = sub.add_parser("bridge", help="serial sensor tools").add_subparsers(
        dest="bridge_command", required=True
    )
    bs = br.add_parser("simulate", help="a simulated sensor on a pseudo-terminal")
    bs.add_argument("--pty", action="store_true", help="serve on a new pseudo-terminal (default)")
    bs.add_argument("--link", default=None, help="also make this symlink to the pty")
    bs.add_argument("--rate", type=float, default=100.0, help="samples per second")
    bs.add_argument("--format", choices=["binary", "text"], default="binary")
    bs.add_argument("--replay", default=None, help="play back a CSV of readings instead")
    bs.add_argument(
        "--machine",
        choices=["motor", "pump"],
        default="motor",
        help="motor: a wearing motor (vibration, temperature, current); pump: a progpy"
        " centrifugal pump run to failure and replaced, one reading a minute of pump time"
        " (speed, flow, three temperatures, hour meter, trip flag; needs fedge[maintenance])",
    )
    bs.add_argument("--hours", type=float, default=24.0, help="pump: hours of pump time to play")
    bs.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: never)")
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--fault-rate", type=float, default=0.001, help="faults per sample")
    bs.set_defaults(func=_cmd_bridge_simulate, log_level=logging.WARNING)

    st = sub.add_parser(
        "status",
        help="the fleet as a table: each device's state, model, last round, bytes (from the"
        " retained status messages on the broker)",
    )
    st.add_argument("--broker", default=None, help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    st.add_argument("--fleet", default=None, help="fleet id")
    st.add_argument(
        "--config",
        default=None,
        help="take broker, fleet and [tls] from this TOML (an operator bundle's watch.toml,"
        " or an agent or aggregator config); --broker and --fleet override it",
    )
    st.add_argument("--wait", type=float, default=3.0, help="seconds to wait for statuses")
    st.add_argument("--watch", action="store_true", help="keep redrawing until Ctrl-C")
    st.add_argument("--interval", type=float, default=2.0, help="--watch: seconds per redraw")
    st.add_argument("--json", action="store_true", help="JSON instead of a table")
    st.add_argument("--legend", action="store_true", help="explain the columns")
    st.set_defaults(func=_cmd_status, log_level=logging.WARNING)

    r = sub.add_parser(
        "report",
        help="render a run as a PNG and an HTML page: a fedge sim --out folder, or an"
        " aggregator's state directory (a field run, with a per-device view)",
    )
    r.add_argument("run_dir", help="the --out folder of fedge sim, or an aggregator's state_dir")
    r.add_argument("--png", default=None, help="default: RUN_DIR/report.png")
    r.add_argument("--html", default=None, help="default: RUN_DIR/report.html")
    r.set_defaults(func=_cmd_report, log_level=logging.WARNING)

    fl = sub.add_parser("fleet", help="field-test tools").add_subparsers(
        dest="fleet_command", required=True
    )
    fla = fl.add_parser(
        "launch",
        help="rehearse a field test here: N fedge agent processes and a fedge aggregator"
        " on a real broker, each with its own config, state and log (needs fedge[sim])",
    )
    fla.add_argument("--devices", type=int, default=10, help="agent processes")
    fla.add_argument("--rounds", type=int, default=10)
    fla.add_argument(
        "--partition", default="iid", help="digits split: iid, dominant:P, single, dirichlet:ALPHA"
    )
    fla.add_argument("--seed", type=int, default=0)
    fla.add_argument("--round-timeout", type=float, default=60.0, help="seconds")
    fla.add_argument("--out", default="runs/launch", help="run folder")
    fla.add_argument(
        "--broker",
        default=None,
        help="mqtt://HOST:PORT of a running broker (default: start Mosquitto on a free port)",
    )
    fla.add_argument(
        "--hang",
        type=int,
        default=0,
        help="agents frozen with SIGSTOP once round 1 is done (rounds need only the others)",
    )
    fla.add_argument(
        "--model", default=None, help="a .tflite for digits (default: the bundled digits_mlp)"
    )
    fla.add_argument("--epochs", type=int, default=5, help="local epochs per round")
    fla.add_argument("--batch-size", type=int, default=16)
    fla.add_argument("--lr", type=float, default=0.1)
    fla.add_argument(
        "--agents-per-process",
        type=int,
        default=1,
        help="agents sharing one process (each its own config, state and MQTT connection);"
        " 1: a fedge agent process each",
    )
    fla.set_defaults(func=_cmd_fleet_launch, log_level=logging.WARNING)

    pv = sub.add_parser(
        "provision", help="fleet CA, broker ACL and passwords, a certificate bundle per device"
    )
    pv.add_argument("device_id", nargs="?", help="the device (or gateway) to provision or revoke")
    pv.add_argument("--init", action="store_true", help="make a new fleet CA and broker files")
    pv.add_argument("--revoke", action="store_true", help="revoke DEVICE_ID")
    pv.add_argument(
        "--he",
        action="store_true",
        help="also (with --init) or only make the fleet's CKKS keys for homomorphic encryption"
        " (needs fedge[he]; docs/homomorphic-encryption.md)",
    )
    pv.add_argument("--fleet", default=None, help="fleet id (required with --init)")
    pv.add_argument("--dir", default="fleet-pki", help="provisioning folder (default: %(default)s)")
    pv.add_argument(
        "--server-name",
        action="append",
        dest="server_names",
        metavar="NAME",
        help="--init: the broker's DNS name or IP; --site-gateway: the site broker's; repeatable"
        " (default: localhost, 127.0.0.1)",
    )
    pv.add_argument("--force", action="store_true", help="replace an existing CA or device")
    pv.add_argument("--password", action="store_true", help="also a broker password (port 8884)")
    pv.add_argument("--gateway", action="store_true", help="a bridge identity, not a device")
    pv.add_argument(
        "--site-gateway",
        action="store_true",
        help="a site gateway DEVICE_ID: its broker's files (site ACL, bridge to the central"
        " broker) in PKI/sites/DEVICE_ID/, its shard worker's bundle",
    )
    pv.add_argument(
        "--site",
        default=None,
        metavar="SITE",
        help="a device behind site gateway SITE: on the site broker's ACL and passwd",
    )
    pv.add_argument(
        "--operator",
        action="store_true",
        help="a read-only identity for `fedge status` from a workstation (bundle: watch.toml)",
    )
    pv.add_argument("--max-samples", type=int, default=None, help="cap on its claimed samples")
    pv.add_argument("--broker-host", default=None, help="default: the first --server-name")
    pv.add_argument("--model", default=None, help="model file name in /opt/fedge/models/")
    pv.add_argument("--data", default="/var/lib/fedge/partition.npz", help="its .npz data")
    pv.add_argument("--serial", default=None, metavar="PORT", help="read a sensor, not --data")
    pv.add_argument("--task", default="forecast", choices=["forecast", "autoencode", "classify"])
    pv.add_argument("--days", type=int, default=825, help="certificate validity (default: 825)")
    pv.set_defaults(func=_cmd_provision, log_level=logging.WARNING)
    _every_parser(p, _show_defaults)
    return p


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = HelpWithDefaults
    for action in parser._actions:
        no_help = action.help is None and action.option_strings
        if no_help and action.default not in (None, False, argparse.SUPPRESS):
            action.help = "(default: %(default)s)"  # argparse shows nothing for help=None


class _Given(argparse.Action):
    """Stores the value and notes that it was given (``args.given``), so that a scenario can
    have defaults of its own."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", set()) | {self.dest}


class HelpWithDefaults(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or "default" in text
            or action.default in (None, False, argparse.SUPPRESS)
        ):
            return text
        return text + " (default: %(default)s)"


def _every_parser(
    parser: argparse.ArgumentParser, do: Callable[[argparse.ArgumentParser], None]
) -> None:
    do(parser)
    for action in parser._actions:  # argparse keeps subcommands only here
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _every_parser(sub, do)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedge")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    level = args.log_level - 10 * args.verbose
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from fedge.configfile import EX_CONFIG, ConfigError

    try:
        return int(args.func(args))
    except ConfigError as exc:
        # Every problem, one line each; 78 tells systemd not to restart (the config is wrong).
        for line in exc.problems:
            print(f"fedge: error: {line}", file=sys.stderr)
        return EX_CONFIG
    except _state_errors() as exc:
        # A state file that cannot be trusted needs a person too: no restart loop.
        print(f"fedge: error: {exc}", file=sys.stderr)
        return EX_CONFIG
    except _expected_errors() as exc:
        print(f"fedge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

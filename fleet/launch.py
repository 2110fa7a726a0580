"""``fedge fleet launch``: rehearse a field test on one machine with real processes.

Where ``fedge sim`` runs every device as a thread of one process, a launch starts N
``fedge agent`` processes and one ``fedge aggregator`` process, each from its own config file,
with its own state folder and log file, against a real broker (a Mosquitto of its own on a
free port, or ``--broker``). Rounds are signed with a key made for the run and pinned in every
agent's config, as in production. Everything lands in one run folder::

    OUT/configs/   aggregator.toml, dev000.toml, ...   what each service was started with
    OUT/logs/      aggregator.log, dev000.log, ...     each process's stdout and stderr
    OUT/state/     aggregator/ (rounds.jsonl, aggregator.sqlite), dev000/, ...
    OUT/data/      dev000.npz, ... (each device's partition), eval.npz (held out)
    OUT/keys/      signing.key, signing.pub
    OUT/broker/    mosquitto.conf and mosquitto.log (when the launch started the broker)
    OUT/report.png, OUT/report.html, OUT/launch.json

The launch ends when the aggregator exits after its rounds; the agents are then stopped with
SIGTERM, as systemd stops them. Each child runs in a process group of its own, and every exit
from :func:`launch` (an error, Ctrl-C, SIGTERM) stops them all first.

Errors: ``LaunchError`` (a ``ValueError``) with one line: bad options, a broker that does not
start, a child that exits before the rounds are done (naming it and its log), or a run that
outlasts its time budget.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import digits
from .mosquitto import LocalMosquitto, MosquittoError
from .partition import parse_scheme, partition
from .signing_keys import write_signing_pair
from .sim import bundled_model

AGGREGATOR = "aggregator"
STOP_TIMEOUT_S = 30.0  # an agent that has not exited this long after SIGTERM is killed
POLL_S = 0.5
LOG_LINE_CHARS = 240  # of a child's last log line, quoted in an error
PLAIN_BROKER = re.compile(r"^mqtt://[^/:@\s]+(:\d+)?/?$")
# The sim's training settings (fedge sim's defaults), so a launch compares with a sim run.
TRAINING: dict[str, Any] = {"epochs": 5, "batch_size": 16, "lr": 0.1}


class LaunchError(ValueError):
    """A launch cannot start or did not finish; ``str()`` is one line."""


@dataclass(frozen=True)
class LaunchOptions:
    devices: int = 10
    rounds: int = 10
    partition: str = "iid"
    seed: int = 0
    round_timeout: float = 60.0
    out: Path = Path("runs/launch")
    broker: str | None = None  # mqtt://HOST:PORT; None: a Mosquitto of the launch's own
    hang: int = 0  # agents stopped with SIGSTOP once round 1 is done (an unreliable device)
    show_progress: bool = True
    model: Path | None = None  # a digits model (64 inputs, 10 classes); None: the bundled one
    epochs: int = TRAINING["epochs"]
    batch_size: int = TRAINING["batch_size"]
    lr: float = TRAINING["lr"]
    # Agents per process: 1 is a `fedge agent` process each; more share one process
    # (fleet/agent_host.py: one MQTT connection each, on one network thread).
    agents_per_process: int = 1

    @property
    def training(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr}


# -- config files (pure) -------------------------------------------------------------------


def toml_value(value: Any) -> str:
    """One TOML value: strings and paths quoted (JSON escapes are TOML escapes), lists inline."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def toml_text(table: dict[str, Any], header: str = "") -> str:
    """``table`` as TOML: plain keys first, then each dict value as a ``[section]``."""
    lines = [header] if header else []
    lines += [f"{k} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for name, sub in table.items():
        if isinstance(sub, dict):
            lines += ["", f"[{name}]"] + [f"{k} = {toml_value(v)}" for k, v in sub.items()]
    return "\n".join(lines) + "\n"


def agent_table(
    device: str,
    *,
    fleet: str,
    broker: str,
    model: Path,
    data: Path,
    state_dir: Path,
    public_key: Path,
    seed: int,
) -> dict[str, Any]:
    """What ``fedge agent`` needs (fedge.agent.config): its data, its state, the pinned key."""
    return {
        "device_id": device,
        "fleet": fleet,
        "broker": broker,
        "aggregator_keys": [public_key],
        "model": model,
        "data": data,
        "state_dir": state_dir,
        "seed": seed,
    }


def aggregator_table(
    *,
    fleet: str,
    broker: str,
    model: Path,
    state_dir: Path,
    signing_key: Path,
    eval_data: Path,
    rounds: int,
    min_devices: int,
    round_timeout: float,
    seed: int,
    training: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What ``fedge aggregator`` needs (fedge.aggregator.config): a round starts once
    ``min_devices`` are online, rounds are signed, and it exits after ``rounds``."""
    return {
        "fleet": fleet,
        "broker": broker,
        "client_id": f"{fleet}-{AGGREGATOR}",
        "signing_key": signing_key,
        "model": model,
        "state_dir": state_dir,
        "rounds": rounds,
        "min_devices": min_devices,
        "round_timeout": float(round_timeout),
        "eval_data": eval_data,
        "seed": seed,
        "training": dict(training or TRAINING),
    }


# -- the run folder -------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFolder:
    """Where everything of one launch goes (see the module docstring)."""

    out: Path

    OWNED = ("configs", "logs", "state", "data", "keys", "broker")
    FILES = ("report.png", "report.html", "launch.json")

    def config(self, name: str) -> Path:
        return self.out / "configs" / f"{name}.toml"

    def log(self, name: str) -> Path:
        return self.out / "logs" / f"{name}.log"

    def state(self, name: str) -> Path:
        return self.out / "state" / name

    @property
    def rounds(self) -> Path:
        return self.state(AGGREGATOR) / "rounds.jsonl"

    def fresh(self) -> RunFolder:
        """Empty what a previous launch left here (only the launch's own folders and files:
        ``--out`` may hold other things), so no old state or retained key mixes in."""
        for name in self.OWNED:
            shutil.rmtree(self.out / name, ignore_errors=True)
            (self.out / name).mkdir(parents=True)
        for name in self.FILES:
            (self.out / name).unlink(missing_ok=True)
        return self


def device_ids(devices: int) -> list[str]:
    return [f"dev{i:03d}" for i in range(devices)]


def write_run(opts: LaunchOptions, run: RunFolder, broker: str, fleet: str) -> list[str]:
    """Data, keys and every config file of the run; returns the device ids."""
    split = digits(opts.seed)
    try:
        parts = partition(
            opts.partition, split.y_train, opts.devices, np.random.default_rng(opts.seed)
        )
    except ValueError as exc:
        raise LaunchError(f"--partition {opts.partition}: {exc}") from exc
    model = (opts.model or bundled_model()).resolve()
    signing_key, public_key = write_signing_pair(run.out / "keys")
    eval_data = run.out / "data" / "eval.npz"
    np.savez(eval_data, x=split.x_test, y=split.y_test)
    devices = device_ids(opts.devices)
    for i, (device, idx) in enumerate(zip(devices, parts, strict=True)):
        data = run.out / "data" / f"{device}.npz"
        np.savez(data, x=split.x_train[idx], y=split.y_train[idx])
        table = agent_table(
            device,
            fleet=fleet,
            broker=broker,
            model=model,
            data=data.resolve(),
            state_dir=run.state(device).resolve(),
            public_key=public_key.resolve(),
            seed=opts.seed * 1000 + i,
        )
        run.config(device).write_text(toml_text(table, "# fedge agent, by fedge fleet launch"))
    table = aggregator_table(
        fleet=fleet,
        broker=broker,
        model=model,
        state_dir=run.state(AGGREGATOR).resolve(),
        signing_key=signing_key.resolve(),
        eval_data=eval_data.resolve(),
        rounds=opts.rounds,
        # Every device, but for the ones that will hang: once the broker marks them offline
        # the rounds go on without them, as a field aggregator set up for the rest would.
        min_devices=opts.devices - opts.hang,
        round_timeout=opts.round_timeout,
        seed=opts.seed,
        training=opts.training,
    )
    run.config(AGGREGATOR).write_text(toml_text(table, "# fedge aggregator, by fedge fleet launch"))
    return devices


# -- processes ------------------------------------------------------------------------------


def fedge_command(role: str, config: Path) -> list[str]:
    """``python -m fedge.cli agent|aggregator --config FILE``, with this interpreter."""
    return [sys.executable, "-m", "fedge.cli", role, "--config", str(config)]


Command = Callable[[str, Path], list[str]]


def host_command(configs: list[Path]) -> list[str]:
    """One process for several agents (fleet/agent_host.py), with this interpreter."""
    return [sys.executable, "-m", "fedge.fleet.agent_host", *map(str, configs)]


def agent_processes(devices: list[str], per_process: int) -> list[tuple[str, list[str]]]:
    """The agent processes to start, (name, devices) each: a process per device, or hosts
    ``host000``... of ``per_process`` devices."""
    if per_process <= 1:
        return [(d, [d]) for d in devices]
    groups = [devices[i : i + per_process] for i in range(0, len(devices), per_process)]
    return [(f"host{i:03d}", group) for i, group in enumerate(groups)]


@dataclass
class Child:
    name: str
    log: Path
    proc: subprocess.Popen[bytes]
    hung: bool = False

    def send(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):  # it has exited already
            os.killpg(self.proc.pid, sig)  # its own group: anything it started goes too

    def last_line(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1][:LOG_LINE_CHARS] if lines else ""

    def exited_early(self, code: int) -> LaunchError:
        said = self.last_line()
        return LaunchError(
            f"{self.name} exited with status {code} before the rounds were done"
            + (f" ({said})" if said else "")
            + f"; see {self.log}"
        )


def spawn(name: str, argv: list[str], log: Path) -> Child:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the launcher only; it stops them in order
        )
    return Child(name, log, proc)


def stop_children(children: list[Child], timeout: float = STOP_TIMEOUT_S) -> dict[str, str]:
    """SIGTERM to every child still running (SIGCONT first to a hung one), SIGKILL to any still
    there after ``timeout``. Returns how each one ended: ``ok``, ``status N`` or ``killed``."""
    running = [c for c in children if c.proc.poll() is None]
    for child in running:
        child.send(signal.SIGTERM)
        if child.hung:
            child.send(signal.SIGCONT)
    deadline = time.monotonic() + timeout
    ended: dict[str, str] = {}
    for child in children:
        try:
            code = child.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.send(signal.SIGKILL)
            child.proc.wait()
            ended[child.name] = "killed"
            continue
        ended[child.name] = "ok" if code == 0 else f"status {code}"
    return ended


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM to the launcher unwinds like Ctrl-C, through the ``finally`` that stops the
    children (the default action would leave them running)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: nothing to install
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class RoundsTail:
    """New complete lines of the aggregator's rounds.jsonl since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.lines: list[dict[str, Any]] = []

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(complete)
        new = [json.loads(line) for line in complete.splitlines() if line.strip()]
        self.lines += new
        return new

    @property
    def done(self) -> list[dict[str, Any]]:
        return [r for r in self.lines if r.get("status") == "done"]


# -- the launch -----------------------------------------------------------------------------


@dataclass
class LaunchResult:
    out: Path
    fleet: str
    broker: str
    devices: list[str]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0
    stopped: dict[str, str] = field(default_factory=dict)  # agent -> ok / status N / killed
    hung: list[str] = field(default_factory=list)
    report: tuple[Path, Path] | None = None
    report_error: str | None = None

    @property
    def done(self) -> list[dict[str, Any]]:
        return [r for r in self.rounds if r.get("status") == "done"]

    @property
    def final_accuracy(self) -> float | None:
        return self.done[-1].get("accuracy") if self.done else None

    def summary(self) -> dict[str, Any]:
        return {
            "devices": len(self.devices),
            "fleet": self.fleet,
            "broker": self.broker,
            "rounds_done": len(self.done),
            "rounds_failed": len(self.rounds) - len(self.done),
            "final_accuracy": self.final_accuracy,
            "wall_time_s": round(self.wall_time_s, 1),
            "hung": self.hung,
            "agents_not_stopped_cleanly": {d: s for d, s in self.stopped.items() if s != "ok"},
        }


def check_options(opts: LaunchOptions) -> None:
    if opts.devices < 1:
        raise LaunchError(f"--devices must be at least 1, not {opts.devices}")
    if opts.rounds < 1:
        raise LaunchError(f"--rounds must be at least 1, not {opts.rounds}")
    if not opts.round_timeout > 0:
        raise LaunchError(f"--round-timeout must be above 0, not {opts.round_timeout:g}")
    if opts.model is not None and not Path(opts.model).is_file():
        raise LaunchError(f"--model {opts.model}: no such file")
    if opts.epochs < 1 or opts.batch_size < 1 or not opts.lr > 0:
        raise LaunchError("--epochs and --batch-size must be at least 1, --lr above 0")
    if opts.agents_per_process < 1:
        raise LaunchError(f"--agents-per-process must be at least 1, not {opts.agents_per_process}")
    if opts.hang and opts.agents_per_process > 1:
        raise LaunchError("--hang freezes whole processes: use it with --agents-per-process 1")
    if not 0 <= opts.hang < opts.devices:
        raise LaunchError(f"--hang must be from 0 to {opts.devices - 1}, not {opts.hang}")
    if opts.broker is not None and not PLAIN_BROKER.match(opts.broker):
        raise LaunchError(
            f"--broker {opts.broker}: give mqtt://HOST:PORT (a TLS broker needs each device's"
            " certificate: see docs/field-test.md)"
        )
    try:
        parse_scheme(opts.partition)
    except ValueError as exc:
        raise LaunchError(f"--partition: {exc}") from exc


def launch(
    opts: LaunchOptions,
    *,
    command: Command = fedge_command,
    echo: Callable[[str], None] = print,
) -> LaunchResult:
    """Run the rehearsal; every child is stopped before this returns or raises."""
    check_options(opts)
    run = RunFolder(Path(opts.out)).fresh()
    # A fleet id of the run's own: on a shared broker, no retained round of another run
    # (signed by another key) reaches these agents.
    fleet = f"launch-{random.SystemRandom().getrandbits(32):08x}"
    mosquitto: LocalMosquitto | None = None
    children: list[Child] = []
    with _sigterm_as_interrupt():
        try:
            if opts.broker is None:
                try:
                    mosquitto = LocalMosquitto(run.out / "broker").start()
                except MosquittoError as exc:
                    raise LaunchError(str(exc)) from exc
            broker = opts.broker or mosquitto.url  # type: ignore[union-attr]
            devices = write_run(opts, run, broker, fleet)
            result = LaunchResult(run.out, fleet, broker, devices)
            echo(
                f"launching {len(devices)} agents and an aggregator (fleet {fleet}) on {broker};"
                f" logs in {run.out / 'logs'}/\nwatch it from another terminal:"
                f" fedge status --broker {broker} --fleet {fleet} --watch"
            )
            started = time.monotonic()
            aggregator = spawn(
                AGGREGATOR, command(AGGREGATOR, run.config(AGGREGATOR)), run.log(AGGREGATOR)
            )
            children.append(aggregator)
            agents = []
            for name, group in agent_processes(devices, opts.agents_per_process):
                if len(group) == 1 and opts.agents_per_process == 1:
                    argv = command("agent", run.config(name))
                else:
                    argv = host_command([run.config(d) for d in group])
                agents.append(spawn(name, argv, run.log(name)))
                children.append(agents[-1])
            result.rounds = _watch(opts, aggregator, agents, run, result)
            result.wall_time_s = time.monotonic() - started
            result.stopped = stop_children(agents)
            children.clear()
        finally:
            stop_children(children)
            if mosquitto is not None:
                mosquitto.stop()
    _report(run, result)
    (run.out / "launch.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
    return result


def _watch(
    opts: LaunchOptions,
    aggregator: Child,
    agents: list[Child],
    run: RunFolder,
    result: LaunchResult,
) -> list[dict[str, Any]]:
    """Show rounds as the aggregator logs them until it exits; a child that exits first, or a
    run past its time budget, raises LaunchError."""
    from .progress import RoundDisplay

    tail = RoundsTail(run.rounds)
    # Failed rounds are announced again: allow as many again as were asked for (as fedge sim).
    budget = opts.round_timeout * (2 * opts.rounds + 2)
    deadline = time.monotonic() + budget
    with RoundDisplay(opts.rounds, enabled=opts.show_progress) as display:
        while True:
            code = aggregator.proc.poll()
            for line in tail.read():
                display.round_done(line)
            if opts.hang and not result.hung and tail.done:
                result.hung = _hang(agents, opts.hang, opts.seed)
            if code is not None:
                break
            for agent in agents:
                agent_code = agent.proc.poll()
                if agent_code is not None:
                    raise agent.exited_early(agent_code)
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"{len(tail.done)} of {opts.rounds} rounds done in {budget:g} s"
                    f" (2 x rounds + 2 round timeouts); see {aggregator.log}"
                )
            time.sleep(POLL_S)
    if code != 0:
        raise aggregator.exited_early(code)
    return tail.lines


def _hang(agents: list[Child], count: int, seed: int) -> list[str]:
    """SIGSTOP ``count`` agents (chosen by ``seed``): they keep their connection open and
    answer nothing, like a device that froze; the broker marks them offline after keepalive."""
    chosen = random.Random(seed).sample(agents, count)
    for agent in chosen:
        agent.send(signal.SIGSTOP)
        agent.hung = True
    return sorted(a.name for a in chosen)


def _report(run: RunFolder, result: LaunchResult) -> None:
    """What ``fedge report`` writes, from the aggregator's state folder, into the run folder."""
    from .report import ReportError, render_report

    try:
        result.report = render_report(
            run.state(AGGREGATOR), png=run.out / "report.png", html=run.out / "report.html"
        )
    except ReportError as exc:
        result.report_error = str(exc)


def print_outcome(result: LaunchResult, rounds: int, echo: Callable[[str], None] = print) -> int:
    """Say what happened and where everything is; 0 when every round was done and every
    agent stopped cleanly, else 1."""
    acc = result.final_accuracy
    out = result.out
    echo(
        f"{len(result.done)} of {rounds} rounds done in {result.wall_time_s:.1f} s by"
        f" {len(result.devices)} agents"
        + ("" if acc is None else f"; final accuracy {acc:.2%}")
        + (f"; hung with SIGSTOP: {', '.join(result.hung)}" if result.hung else "")
    )
    bad = {d: s for d, s in result.stopped.items() if s != "ok"}
    for device, how in sorted(bad.items()):
        ending = "was killed" if how == "killed" else f"exited with {how}"
        echo(f"warning: {device} did not stop cleanly on SIGTERM ({ending}); see {out}/logs/")
    first, last = result.devices[0], result.devices[-1]
    echo(f"configs: {out}/configs/ ({AGGREGATOR}.toml, {first}.toml .. {last}.toml)")
    echo(f"logs:    {out}/logs/")
    echo(f"state:   {out}/state/{AGGREGATOR}/ (rounds.jsonl), {out}/state/{first}/ ..")
    if result.report is not None:
        echo(f"report:  {result.report[0]} and {result.report[1]}")
    else:
        echo(f"report:  none ({result.report_error})")
    echo(f"summary: {out}/launch.json")
    return 0 if len(result.done) == rounds and not bad else 1


__all__ = [
    "LaunchError",
    "LaunchOptions",
    "LaunchResult",
    "agent_table",
    "aggregator_table",
    "launch",
    "print_outcome",
    "toml_text",
]

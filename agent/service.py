"""Glue from a config file to a running agent: runtime, data, link, state, systemd."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from fedge.models.checks import model_io
from fedge.models.selftest import load_proven_runtime
from fedge.protocol import Link, Status
from fedge.protocol.signing import load_public_key

from fedge.brokerconfig import broker_link
from fedge.heconfig import load_he_keys
from fedge.systemd import notify, serve_until_stopped, watchdog_petter

from .config import AgentConfig
from .daemon import Agent
from .dataset import Dataset, load_npz
from .eligibility import (
    ByteBudget,
    Decision,
    EligibilityConfig,
    ReadingLog,
    Readings,
    decide,
    read_readings,
)
from .outbox import Outbox
from .residual import ResidualStore
from .state import load_state, note_state, reset_state, save_state

log = logging.getLogger("fedge.agent")


def state_file(cfg: AgentConfig) -> Path:
    return cfg.state_dir / f"agent-{cfg.device_id}.json"


def residual_file(cfg: AgentConfig) -> Path:
    return cfg.state_dir / f"agent-{cfg.device_id}.residual.npz"


def outbox_file(cfg: AgentConfig) -> Path:
    return cfg.state_dir / f"agent-{cfg.device_id}.outbox"


def build_agent(cfg: AgentConfig, link: Link | None = None) -> Agent:
    import numpy as np

    runtime = load_proven_runtime(  # each backend proven in a child first, verdicts cached
        cfg.model,
        prefer=cfg.runtime,
        delegates=cfg.delegates,
        num_threads=cfg.num_threads,
        cache_dir=cfg.state_dir,
    )
    sensor = None
    data: Dataset | Callable[[], Dataset]
    fits = model_io(cfg.model)  # what the model takes: the data is checked against it
    if cfg.serial is not None and cfg.task is not None:
        from .sensor_source import SensorSource  # pyserial and SQLite: the serial path only

        sensor = SensorSource(
            cfg.serial, cfg.task, cfg.state_dir / f"samples-{cfg.device_id}.sqlite", model=fits
        )
        data = sensor.dataset
    else:
        assert cfg.data is not None
        data = load_npz(cfg.data, fits)
    state_path = state_file(cfg)
    outbox = Outbox(outbox_file(cfg))
    pending = outbox.take()  # an answer commits with its outbox: the state file may be older
    state = load_state(state_path, answered=None if pending is None else pending.state)
    if link is None:
        will = Agent.will(cfg.device_id, cfg.fleet)
        birth = Agent.birth(cfg.device_id, cfg.fleet, quiet=cfg.quiet)
        link = broker_link(cfg.broker, cfg.device_id, cfg.tls, will, birth)
    budget = eligibility = None
    problems = ReadingLog()  # unreadable sysfs values, logged once per kind
    if cfg.eligibility is not None:
        budget, eligibility = _eligibility(cfg.eligibility, state.upload_budget, problems)
    return Agent(
        device_id=cfg.device_id,
        fleet=cfg.fleet,
        link=link,
        runtime=runtime,
        data=data,
        state=state,
        save_state=lambda s: save_state(state_path, s),
        note_state=lambda s: note_state(state_path, s),
        rng=np.random.default_rng(cfg.seed),
        residual_store=ResidualStore(residual_file(cfg)),
        outbox=outbox,
        eligibility=eligibility,
        budget=budget,
        max_payload=cfg.max_payload,
        sensor=sensor,
        trusted_keys=[load_public_key(path.read_bytes()) for path in cfg.aggregator_keys],
        readings=lambda: readings_dict(read_readings(problems=problems)),
        he_keys=None if cfg.he is None else load_he_keys(cfg.he.key_file, secret=True),
        quiet=cfg.quiet,
        rest_rounds=cfg.rest_rounds,
    )


def readings_dict(readings: Readings) -> dict[str, float]:
    """The readings a status carries: the known ones, ``on_mains`` as 0 or 1."""
    values = {
        "on_mains": None if readings.on_mains is None else float(readings.on_mains),
        "battery_percent": readings.battery_percent,
        "cpu_temp_c": readings.cpu_temp_c,
        "load_per_cpu": readings.load_per_cpu,
    }
    return {k: v for k, v in values.items() if v is not None}


def status_line(status: Status, update_bytes: int) -> str:
    """What ``systemctl status`` shows, e.g. "idle; round 12: sent 1.9 kB; model v12"."""
    parts = [status.state]
    if status.last_round:
        outcome = status.outcome or "answered"
        if outcome == "sent":
            outcome += f" {update_bytes / 1000:.1f} kB"
        elif status.skip_reason:
            outcome += f" ({status.skip_reason})"
        parts.append(f"round {status.last_round}: {outcome}")
    version = status.model_version
    parts.append("no model yet" if version is None or version < 0 else f"model v{version}")
    if status.anomaly_score is not None:
        parts.append(f"anomaly {status.anomaly_score:.4g}")
    return "; ".join(parts)


def _eligibility(
    cfg: EligibilityConfig, saved: dict | None, problems: ReadingLog
) -> tuple[ByteBudget, Callable[[int], Decision]]:
    budget = ByteBudget()
    if saved:
        try:
            budget = ByteBudget.from_dict(saved)
        except ValueError as exc:
            log.warning("upload budget in the state file unreadable (%s); starting afresh", exc)

    def check(upload_bytes: int) -> Decision:
        return decide(cfg, read_readings(problems=problems), budget, upload_bytes)

    return budget, check


# Seconds the loop waits for a message before it looks at the stop flag again: a message
# ends the wait at once, and so does SIGTERM (serve_until_stopped's wake), so this only paces
# an idle device's wake-ups (bench/README.md, "The agent between rounds": 1.7 wake-ups/s with
# 2 s here and paho's network thread waking every second).
IDLE_POLL = 10.0


def serve(cfg: AgentConfig, *, reset: bool = False) -> int:
    """Run until SIGTERM/SIGINT. Tells systemd when ready and pets its watchdog."""
    if reset:  # the state, and what it vouches for: the residual and the outbox
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        box = Outbox(outbox_file(cfg))
        for path in (state_file(cfg), residual_file(cfg), *box.slots, box.legacy):
            reset_state(path, stamp)
    agent = build_agent(cfg)
    agent.heartbeat = watchdog_petter()

    def show(status: Status) -> None:  # `systemctl status` shows the latest
        notify("STATUS=" + status_line(status, agent.last_update_bytes))

    agent.on_status = show
    metrics = None
    if cfg.metrics_port:  # prometheus_client (and its HTTP server) only when metrics are on
        from fedge.metrics import AgentCollector, serve_metrics

        metrics = serve_metrics([AgentCollector(agent)], cfg.metrics_port, cfg.metrics_addr)
    agent.start(keep_trying=True)
    try:
        serve_until_stopped(agent.step, poll=IDLE_POLL, wake=agent.link.wake)
    finally:
        agent.stop()
        if metrics is not None:
            metrics.close()
    return 0

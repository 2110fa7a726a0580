"""Several ``fedge agent`` configs in one process: how ``fedge fleet launch --agents-per-process``
rehearses a large fleet on one machine.

Each agent is built from its own config file exactly as ``fedge agent`` builds it (its state
folder, its data, its pinned key, its own MQTT connection and client id, Last Will and birth
message), but the links share one :class:`~fedge.protocol.paho_hub.PahoHub` thread and the
agents are stepped by a :class:`~fleet.device_pool.DevicePool`, so a thousand agents are a few
processes instead of a thousand. Their log is one file per host, each line tagged with the
device whose step wrote it. SIGTERM or SIGINT
stops every agent (each says "offline"), as ``systemctl stop`` would stop one.

    python -m fedge.fleet.agent_host dev000.toml dev001.toml ...
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from fedge.agent.config import AgentConfig
from fedge.agent.daemon import Agent
from fedge.agent.service import build_agent
from fedge.protocol.paho_hub import PahoHub

from fedge.brokerconfig import broker_link
from fedge.configfile import EX_CONFIG, ConfigError, load_config

from .device_pool import DevicePool, raise_fd_limit, start_devices

log = logging.getLogger("fedge.fleet")
WORKERS = 4  # threads stepping the agents of one host


def build_hosted(cfg: AgentConfig, hub: PahoHub) -> Agent:
    """The agent ``fedge agent --config`` would run, with its link on ``hub``."""
    will = Agent.will(cfg.device_id, cfg.fleet)
    birth = Agent.birth(cfg.device_id, cfg.fleet, quiet=cfg.quiet)
    link = broker_link(cfg.broker, cfg.device_id, cfg.tls, will, birth, hub=hub)
    return build_agent(cfg, link=link)


def serve(configs: Sequence[Path]) -> int:
    """Run the agents of ``configs`` until SIGTERM/SIGINT; 0, or 1 if an agent crashed."""
    cfgs = [load_config(path, AgentConfig) for path in configs]
    raise_fd_limit(len(cfgs) + 64)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    crashed: list[str] = []
    hub = PahoHub().start()
    agents: list[Agent] = []
    try:
        agents = [build_hosted(cfg, hub) for cfg in cfgs]
        for agent in agents:
            tag_steps(agent)
        start_devices(agents)
        pool = DevicePool(stop, workers=WORKERS, on_crash=lambda a: crashed.append(a.device_id))
        pool.start(agents)
        log.info("%d agents online: %s", len(agents), ", ".join(a.device_id for a in agents))
        stop.wait()
        pool.join()
    finally:
        for agent in agents:
            try:
                agent.stop()
            except Exception:  # one agent's failing goodbye must not keep the others online
                log.exception("agent %s did not stop cleanly", agent.device_id)
        hub.close()
    if crashed:
        log.error("agent(s) crashed: %s", ", ".join(crashed))
        return 1
    return 0


_stepping = threading.local()  # the agent a pool worker is stepping


class DeviceTag(logging.Filter):
    """Adds ``device``: the agent whose step logged the line ("-" outside a step)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.device = getattr(_stepping, "device", "-")
        return True


def tag_steps(agent: Agent) -> None:
    """Make ``agent.step`` say which device the lines it logs are about."""
    step = agent.step

    def tagged(timeout: float | None) -> bool:
        _stepping.device = agent.device_id
        try:
            return step(timeout)
        finally:
            _stepping.device = "-"

    agent.step = tagged  # type: ignore[method-assign]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fedge-agent-host", description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+", help="agent configs (TOML), one per agent")
    args = ap.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(DeviceTag())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(device)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    try:
        return serve([Path(p) for p in args.configs])
    except ConfigError as exc:
        for line in exc.problems:
            print(f"fedge: error: {line}", file=sys.stderr)
        return EX_CONFIG


if __name__ == "__main__":
    sys.exit(main())

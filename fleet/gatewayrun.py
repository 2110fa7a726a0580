"""Site gateways against real brokers, what crossed each uplink, and the flat result.

A site gateway is a shard worker on the site's own broker. ``gateway_run`` takes a central
broker and one broker per site, each bridged to the central one by
``broker_config/site-gateway.conf`` (``site_bridge`` makes its text for a test or a bench).
The coordinator (``[shards] workers`` = the sites) connects to the central broker; each
site's worker and agents to the site's broker. Observers record every update on the site
brokers (for ``fedge.fleet.shardrun.replay_single``: one aggregator given the same updates
must reach the same model) and every message that reached the central broker from a site::

    agents --update/+--> site broker --$share--> worker  (updates stay at the site)
    site broker ==bridge==> central: status/+, shard/{site}/accepted, shard/{site}/partial
    central ==bridge==> site broker: round, global, shard/{site}/close
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fedge.agent.config import AgentConfig
from fedge.agent.service import build_agent
from fedge.aggregator.service import build_aggregator
from fedge.aggregator.shard_service import build_worker
from fedge.protocol import Topics, make_link
from fedge.protocol.wire import publish_size

from .shardrun import ShardedRun, collect_updates, device_data, serve_until_done, sharded_config

# The site name broker_config/site-gateway.conf is written for, and its TLS lines.
CONF_SITE = "site-a"
TLS_SETTINGS = frozenset(
    {"bridge_cafile", "bridge_certfile", "bridge_keyfile", "bridge_tls_version", "bridge_insecure"}
)


def site_gateway_config() -> Path:
    """``broker_config/site-gateway.conf`` of the source tree this package runs from."""
    here = Path(__file__).resolve().parent.parent / "broker_config" / "site-gateway.conf"
    for path in (here, Path.cwd() / "broker_config" / "site-gateway.conf"):
        if path.is_file():
            return path
    raise FileNotFoundError("broker_config/site-gateway.conf (it ships with the source tree)")


def site_bridge(text: str, site: str, address: str) -> str:
    """site-gateway.conf's ``text`` for ``site``, bridged to ``address`` (host:port) over
    plain MQTT: the TLS lines are left out (loopback only)."""
    out = []
    for line in text.replace(CONF_SITE, site).splitlines():
        key = line.split(" ", 1)[0]
        if key in TLS_SETTINGS:
            continue
        out.append(f"address {address}" if key == "address" else line)
    return "\n".join(out) + "\n"


@dataclass
class Uplink:
    """What reached the central broker from one site, by kind (status, accepted, partial,
    update): messages and MQTT bytes (``publish_size``)."""

    messages: Counter[str] = field(default_factory=Counter)
    bytes: Counter[str] = field(default_factory=Counter)


@dataclass
class GatewayRun:
    run: ShardedRun  # the coordinator's model and rounds, and every update the devices sent
    sites: dict[str, list[str]]  # site -> its devices
    uplink: dict[str, Uplink]  # site -> what crossed its bridge to the central broker
    update_bytes: dict[str, int]  # site -> its devices' update bytes (a relay would carry)


def wait_bridged(site_url: str, site: str, timeout: float = 10.0) -> None:
    """Return once the site broker's bridge ``site`` is connected (its notification)."""
    probe = make_link(site_url, f"probe-{site}")
    probe.connect()
    probe.subscribe(f"$SYS/broker/connection/{site}/state", qos=0)
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            msg = probe.get(0.2)
            if msg is not None and msg.payload == b"1":
                return
        raise RuntimeError(f"the bridge of {site} to the central broker is not up")
    finally:
        probe.close()


def gateway_run(
    central: str,
    sites: dict[str, str],
    workdir: Path,
    *,
    fleet: str,
    devices_per_site: int,
    rounds: int,
    seed: int = 0,
    timeout: float = 300.0,
) -> GatewayRun:
    """``rounds`` rounds with a gateway per site (site -> its broker's URL, bridged to
    ``central``) and ``devices_per_site`` agents at each."""
    names = list(sites)
    tag = fleet[-8:]
    devices = {s: [f"{s}-d{i}-{tag}" for i in range(devices_per_site)] for s in names}
    everyone = [d for s in names for d in devices[s]]
    data = dict(zip(everyone, device_data(workdir, len(everyone), seed), strict=True))
    cfg = sharded_config(
        central,
        workdir,
        fleet=fleet,
        workers=names,
        devices=len(everyone),
        rounds=rounds,
        seed=seed,
    )
    topics = Topics(fleet)
    counter = make_link(central, f"uplink-{tag}")
    counter.connect()
    counter.subscribe(f"{topics.base}/#")
    observers = {s: make_link(url, f"observer-{s}-{tag}") for s, url in sites.items()}
    for obs in observers.values():
        obs.connect()
        obs.subscribe(topics.updates)
    gateways = [build_worker(cfg.model_copy(update={"broker": sites[s]}), s) for s in names]
    coordinator = build_aggregator(cfg)
    agents = [
        build_agent(
            AgentConfig(
                device_id=d,
                fleet=fleet,
                broker=sites[s],
                model=cfg.model,
                data=data[d],
                state_dir=workdir / "agents",
                seed=seed + everyone.index(d),
            )
        )
        for s in names
        for d in devices[s]
    ]
    run = serve_until_done(
        coordinator, gateways, agents, devices=everyone, rounds=rounds, timeout=timeout
    )
    for obs in observers.values():
        collect_updates(obs, run)
        obs.close()
    site_of = {d: s for s in names for d in devices[s]}
    uplink = {s: Uplink() for s in names}
    while (msg := counter.get(1.0)) is not None:
        kind, _, rest = msg.topic[len(topics.base) + 1 :].partition("/")
        if kind in ("status", "update"):
            site = site_of.get(rest)
        elif kind == "shard" and rest.split("/")[1] in ("accepted", "partial"):
            site, _, kind = rest.partition("/")
        else:
            continue  # round, global, close: from the central broker down
        if site is not None:
            uplink[site].messages[kind] += 1
            uplink[site].bytes[kind] += publish_size(msg.topic, len(msg.payload), 1)
    counter.close()
    update_bytes = {s: 0 for s in names}
    for sent in run.updates.values():
        for topic, payload in sent:
            update_bytes[site_of[topics.device_of(topic)]] += publish_size(topic, len(payload), 1)
    return GatewayRun(run=run, sites=devices, uplink=uplink, update_bytes=update_bytes)

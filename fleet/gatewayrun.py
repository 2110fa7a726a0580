"""Site gateways against real brokers, what crossed each uplink, and the flat result.

A site gateway is a shard worker on the site's own broker. ``gateway_run`` takes a central
broker and one broker per site, each bridged to the central one by the bridge section that
``fedge provision --site-gateway`` writes (broker_config/site-gateway.conf; ``site_bridge``
makes it for a test or a bench). The coordinator (``[shards] workers`` = the sites) connects
to the central broker; each site's worker and agents to the site's broker. Observers record
every update on the site brokers (for ``fedge.fleet.shardrun.replay_single``: one aggregator
given the same updates must reach the same model) and every message that reached the central
broker from a site. On brokers with TLS and ACLs (production.conf), ``credentials`` gives each
identity its ``[tls]``: "aggregator", "observer" (reads everything the run records), each
site's worker (``fedge.provision.worker_id``) and each device::

    agents --update/+--> site broker --$share--> worker  (updates stay at the site)
    site broker ==bridge==> central: status/+, shard/{site}/accepted, shard/{site}/partial
    central ==bridge==> site broker: round, global, shard/{site}/close
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fedge.agent.config import AgentConfig
from fedge.agent.service import build_agent
from fedge.aggregator.service import build_aggregator
from fedge.aggregator.shard_service import build_worker
from fedge.protocol import Topics
from fedge.protocol.wire import publish_size

from fedge.brokerconfig import BrokerTls, broker_link
from fedge.provision import AGGREGATOR, bridge_conf_text, worker_id

from .shardrun import ShardedRun, collect_updates, device_data, serve_until_done, sharded_config

# The bridge's TLS settings: left out on loopback without TLS.
TLS_SETTINGS = frozenset(
    {"bridge_cafile", "bridge_certfile", "bridge_keyfile", "bridge_tls_version", "bridge_insecure"}
)
OBSERVER = "observer"
Credentials = Callable[[str], BrokerTls | None]


def site_bridge(site: str, address: str, *, tls: bool = False) -> str:
    """The bridge section of ``site``'s broker to the central one at ``address`` (host:port),
    as ``fedge provision`` writes it (its certificate paths under /etc/mosquitto/certs/);
    without ``tls`` over plain MQTT (loopback only: the TLS lines are left out)."""
    host, _, port = address.rpartition(":")
    text = bridge_conf_text(site, host, int(port))
    if tls:
        return text
    return "".join(
        line + "\n" for line in text.splitlines() if line.split(" ", 1)[0] not in TLS_SETTINGS
    )


def site_devices(sites: Iterable[str], devices_per_site: int, fleet: str) -> dict[str, list[str]]:
    """The device ids ``gateway_run`` gives each site's agents."""
    tag = fleet[-8:]
    return {s: [f"{s}-d{i}-{tag}" for i in range(devices_per_site)] for s in sites}


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
    quiet: list[str]  # the devices quiet at the end (one whose inbox brought nothing listens)


def wait_bridged(
    site_url: str, site: str, timeout: float = 10.0, *, tls: BrokerTls | None = None
) -> None:
    """Return once the site broker's bridge ``site`` is connected (its notification; with an
    ACL, ``tls``'s identity must read ``$SYS/broker/connection/#``)."""
    probe = broker_link(site_url, f"probe-{site}", tls)
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
    credentials: Credentials | None = None,
    signing: tuple[Path, Path] | None = None,
    quiet: Collection[str] = (),
) -> GatewayRun:
    """``rounds`` rounds with a gateway per site (site -> its broker's URL, bridged to
    ``central``) and ``devices_per_site`` agents at each. ``credentials``: each identity's
    ``[tls]`` (above); ``signing``: the aggregator's key pair (private, public), the worker and
    the agents then pin the public key, as a site gateway's bundle does. ``quiet``: devices
    that listen only on their inbox (bridged down from the central broker)."""
    names = list(sites)
    tag = fleet[-8:]
    tls = credentials or (lambda name: None)
    devices = site_devices(names, devices_per_site, fleet)
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
    pinned = () if signing is None else (signing[1],)
    cfg = cfg.model_copy(
        update={"tls": tls(AGGREGATOR), "signing_key": None if signing is None else signing[0]}
    )
    topics = Topics(fleet)
    counter = broker_link(central, f"uplink-{tag}", tls(OBSERVER))
    counter.connect()
    counter.subscribe(f"{topics.base}/#")
    observers = {
        s: broker_link(url, f"observer-{s}-{tag}", tls(OBSERVER)) for s, url in sites.items()
    }
    for obs in observers.values():
        obs.connect()
        obs.subscribe(topics.updates)
    # A gateway's config: its own broker and identity, and the public key, never the private.
    gateways = [
        build_worker(
            cfg.model_copy(
                update={
                    "broker": sites[s],
                    "tls": tls(worker_id(s)),
                    "signing_key": None,
                    "aggregator_keys": pinned,
                }
            ),
            s,
        )
        for s in names
    ]
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
                tls=tls(d),
                aggregator_keys=pinned,
                quiet=d in quiet,
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
    still_quiet = [a.device_id for a in agents if a.quiet and not a.listening]
    return GatewayRun(
        run=run, sites=devices, uplink=uplink, update_bytes=update_bytes, quiet=still_quiet
    )

"""Site gateways over real Mosquittos: a central broker and two site brokers bridged to it by
broker_config/site-gateway.conf, a gateway (shard worker) and two agents at each site, the
coordinator on the central broker. The global model is the one a single aggregator makes of
the same updates, and no update crosses a site's uplink."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fedge.fleet.gatewayrun import gateway_run, site_bridge, site_devices, wait_bridged
from fedge.fleet.shardrun import replay_single
from fedge.protocol import Link
from mosquitto import MosquittoServer, ProductionMosquitto

from fedge.brokerconfig import BrokerTls, broker_link
from fedge.provision import init_fleet, provision_device

pytestmark = [pytest.mark.broker, pytest.mark.slow]
SITES = ("site-a", "site-b")


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[tuple[MosquittoServer, dict[str, MosquittoServer]]]:
    """The central broker and one site broker per site, each bridged to the central one."""
    for name in ("central", *SITES):
        (tmp_path / name).mkdir()
    with MosquittoServer(workdir=tmp_path / "central") as central:
        sites = {}
        try:
            for site in SITES:
                bridge = site_bridge(site, f"{central.host}:{central.port}")
                sites[site] = MosquittoServer(workdir=tmp_path / site, extra_config=bridge).start()
                wait_bridged(sites[site].url, site)
            yield central, sites
        finally:
            for server in sites.values():
                server.close()


def test_two_gateways_give_the_flat_average_and_keep_updates_at_their_sites(
    tmp_path: Path,
    brokers: tuple[MosquittoServer, dict[str, MosquittoServer]],
    fleet_id: str,
) -> None:
    central, sites = brokers
    (tmp_path / "run").mkdir()
    result = gateway_run(
        central.url,
        {s: server.url for s, server in sites.items()},
        tmp_path / "run",
        fleet=fleet_id,
        devices_per_site=2,
        rounds=2,
        timeout=120,
    )
    run = result.run
    assert [r["status"] for r in run.rounds] == ["done", "done"]
    assert all(len(r["participants"]) == 4 for r in run.rounds)
    assert run.accepted == {"site-a": 4, "site-b": 4}  # each gateway took its own devices'
    weights, single = replay_single(run)
    for a, b in zip(run.rounds, single, strict=True):
        assert a["participants"] == b["participants"] and a["weights"] == b["weights"]
    for name, w in weights.items():
        assert np.max(np.abs(run.weights[name] - w)) <= 1e-6
        assert not np.allclose(w, 0)
    for site in SITES:
        up = result.uplink[site]
        assert up.messages["update"] == 0  # no update crossed the bridge
        assert up.messages["partial"] == 2  # one pre-weighted sum a round
        assert up.messages["accepted"] == 4  # a report per answer
        assert up.messages["status"] > 0  # the coordinator saw the site's devices online
        assert result.update_bytes[site] > 0


# -- in production: TLS everywhere, each broker's own ACL ------------------------------------

FLEET = "gw-tls"
BASE = f"fedge/v1/{FLEET}"
ROUNDS = 2
# One device at each site hears only its own inbox (docs/bandwidth.md, Quiet devices).
QUIET = tuple(devices[0] for devices in site_devices(SITES, 2, FLEET).values())
QUIET_S = 0.5  # how long a message that must not arrive is given


def credentials(pki: Path) -> Callable[[str], BrokerTls]:
    """Each identity's [tls] from its provisioning files: the aggregator's, a site worker's
    (its gateway's bundle), or a device's (its bundle; the observer's too)."""

    def tls(name: str) -> BrokerTls:
        if name == "aggregator":
            folder, stem = pki, "aggregator"
        elif name.endswith(".worker"):
            folder, stem = pki / "devices" / name.removesuffix(".worker"), "worker"
        else:
            folder, stem = pki / "devices" / name, "device"
        return BrokerTls(
            ca_file=pki / "ca.crt",
            cert_file=folder / f"{stem}.crt",
            key_file=folder / f"{stem}.key",
        )

    return tls


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fleet from `fedge provision`: two site gateways, two devices behind each, a device on
    the central broker, and "observer", who may read everything the run records (added by hand
    to each broker's ACL: no role of fedge's reads updates but the aggregator and a worker)."""
    pki = tmp_path_factory.mktemp("pki")
    init_fleet(pki, FLEET)
    for site in SITES:
        provision_device(pki, site, FLEET, site_gateway=True)
    for site, devices in site_devices(SITES, 2, FLEET).items():
        for device in devices:
            provision_device(pki, device, FLEET, site=site)
    provision_device(pki, "dev-central", FLEET)
    provision_device(pki, "observer", FLEET, operator=True)
    reads = f"\nuser observer\ntopic read {BASE}/#\ntopic read $SYS/broker/connection/#\n"
    for folder in (pki, *(pki / "sites" / s for s in SITES)):
        with (folder / "fedge.acl").open("a") as acl:
            acl.write(reads)
    return pki


@pytest.fixture(scope="module")
def tls_brokers(
    pki: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProductionMosquitto, dict[str, ProductionMosquitto]]]:
    """production.conf centrally, and at each site with the site's folder and its bridge.conf:
    TLS with the bridge's certificate to the central broker's certificate listener."""
    work = tmp_path_factory.mktemp("brokers")
    for name in ("central", *SITES):
        (work / name).mkdir()
    tls = credentials(pki)("observer")
    with MosquittoServer.production(pki, workdir=work / "central") as central:
        sites: dict[str, ProductionMosquitto] = {}
        try:
            for site in SITES:
                bridge = site_bridge(site, f"{central.host}:{central.tls_port}", tls=True)
                assert "bridge_certfile /etc/mosquitto/certs/bridge.crt" in bridge
                sites[site] = MosquittoServer.production(
                    pki / "sites" / site, extra_config=bridge, workdir=work / site
                ).start()
                wait_bridged(sites[site].url, site, tls=tls)
            yield central, sites
        finally:
            for server in sites.values():
                server.close()


def test_gateways_over_tls_with_each_brokers_acl_give_the_flat_average(
    tmp_path: Path,
    pki: Path,
    tls_brokers: tuple[ProductionMosquitto, dict[str, ProductionMosquitto]],
) -> None:
    central, sites = tls_brokers
    result = gateway_run(
        central.url,
        {s: server.url for s, server in sites.items()},
        tmp_path,
        fleet=FLEET,
        devices_per_site=2,
        rounds=ROUNDS,
        timeout=120,
        credentials=credentials(pki),
        signing=(pki / "signing.key", pki / "signing.pub"),
        quiet=QUIET,
    )
    run = result.run
    assert [r["status"] for r in run.rounds] == ["done"] * ROUNDS, central.log_tail()
    # Every device in every round, the quiet ones too: their rounds and models came down
    # the bridges to their inboxes, which their site's ACL let them read (Mosquitto grants
    # a subscription its ACL denies and then sends nothing: an agent whose inbox brought
    # nothing would still listen to every round, and not count as quiet here).
    assert all(len(r["participants"]) == 4 for r in run.rounds)
    assert sorted(result.quiet) == sorted(QUIET)
    for r in run.rounds:
        assert sorted(r["bytes_down_by_device"]) == sorted(QUIET)
    assert run.accepted == {"site-a": 2 * ROUNDS, "site-b": 2 * ROUNDS}
    weights, single = replay_single(run)
    for a, b in zip(run.rounds, single, strict=True):
        assert a["participants"] == b["participants"] and a["weights"] == b["weights"]
    for name, w in weights.items():
        assert np.max(np.abs(run.weights[name] - w)) <= 1e-6
    for site in SITES:
        up = result.uplink[site]
        assert up.messages["update"] == 0 and up.messages["partial"] == ROUNDS
        assert up.messages["accepted"] == 2 * ROUNDS and up.messages["status"] > 0


def connected(url: str, client_id: str, tls: BrokerTls, *subscriptions: str) -> Link:
    link = broker_link(url, client_id, tls)
    link.connect(timeout=10)
    for topic in subscriptions:
        link.subscribe(topic)
    return link


def forge(url: str, name: str, tls: BrokerTls, topics: list[str]) -> None:
    """``name`` publishes on each of ``topics``; returns once the broker acknowledged them all
    (so it has routed them: whatever a subscriber gets of them is queued before what comes
    next)."""
    link = connected(url, name, tls)
    for topic in topics:
        link.publish(f"{BASE}/{topic}", f"forged by {name}".encode())
    link.close()  # waits for every PUBACK


def heard_until(link: Link, sentinel: bytes) -> list[tuple[str, bytes]]:
    """Every message up to and including the one with payload ``sentinel``."""
    got: list[tuple[str, bytes]] = []
    while not got or got[-1][1] != sentinel:
        msg = link.get(5.0)
        assert msg is not None, f"no {sentinel!r}; heard {got}"
        if not msg.retain:
            got.append((msg.topic, msg.payload))
    return got


def test_on_a_site_broker_devices_write_only_their_own_topics(
    pki: Path, tls_brokers: tuple[ProductionMosquitto, dict[str, ProductionMosquitto]]
) -> None:
    central, sites = tls_brokers
    tls = credentials(pki)
    (dev_a1, dev_a2), (dev_b1, _) = site_devices(SITES, 2, FLEET).values()
    url = sites["site-a"].url
    observer = connected(url, "observer", tls("observer"), f"{BASE}/#")
    up = connected(central.url, "observer", tls("observer"), f"{BASE}/#")
    try:
        mine = [f"update/{dev_a1}", f"status/{dev_a1}"]
        others = [f"update/{dev_a2}", f"status/{dev_a2}", "round", "global"]
        forge(url, dev_a1, tls(dev_a1), [*others, "shard/site-a/partial"])
        # Valid certificates of the fleet CA with no block in this site's ACL.
        forge(url, dev_b1, tls(dev_b1), mine)  # site-b's device
        forge(url, "dev-central", tls("dev-central"), mine)  # the central broker's
        forge(url, "site-a", tls("site-a.worker"), mine + others)  # the worker
        device = connected(url, dev_a1, tls(dev_a1))
        device.publish(f"{BASE}/update/{dev_a1}", b"own update")
        device.publish(f"{BASE}/status/{dev_a1}", b"own status")
        device.close()
        assert heard_until(observer, b"own status") == [
            (f"{BASE}/update/{dev_a1}", b"own update"),
            (f"{BASE}/status/{dev_a1}", b"own status"),
        ]
        # Upstream only the status crossed the bridge: no update, round, global or partial.
        assert heard_until(up, b"own status") == [(f"{BASE}/status/{dev_a1}", b"own status")]
    finally:
        observer.close()
        up.close()


def test_on_the_central_broker_a_bridge_and_a_worker_write_only_their_sites_topics(
    pki: Path, tmp_path: Path
) -> None:
    """A central broker of its own (the running bridges would take back their sessions from a
    client that connects with their certificate)."""
    tls = credentials(pki)
    dev_a1 = site_devices(SITES, 2, FLEET)["site-a"][0]
    bridge = BrokerTls(
        ca_file=pki / "ca.crt",
        cert_file=pki / "sites" / "site-a" / "bridge.crt",
        key_file=pki / "sites" / "site-a" / "bridge.key",
    )
    with MosquittoServer.production(pki, workdir=tmp_path) as central:
        url = central.url
        observer = connected(url, "observer", tls("observer"), f"{BASE}/#")
        site_a = connected(url, "site-a", bridge, f"{BASE}/update/+")
        try:
            forged = ["global", "round", f"update/{dev_a1}", "status/dev-central"]
            forge(url, "site-a", bridge, [*forged, "shard/site-b/partial"])
            forge(url, "site-a.worker", tls("site-a.worker"), ["shard/site-a/partial"])
            forge(url, dev_a1, tls(dev_a1), [f"update/{dev_a1}", f"status/{dev_a1}"])
            forge(url, "observer", tls("observer"), [f"update/{dev_a1}"])
            device = connected(url, "dev-central", tls("dev-central"))
            device.publish(f"{BASE}/update/dev-central", b"an update")
            device.close()
            site_a.publish(f"{BASE}/status/{dev_a1}", b"a status from the site")
            site_a.publish(f"{BASE}/shard/site-a/partial", b"the site's partial sum")
            assert heard_until(observer, b"the site's partial sum") == [
                (f"{BASE}/update/dev-central", b"an update"),
                (f"{BASE}/status/{dev_a1}", b"a status from the site"),
                (f"{BASE}/shard/site-a/partial", b"the site's partial sum"),
            ]
            assert site_a.get(QUIET_S) is None  # the bridge reads no update
        finally:
            observer.close()
            site_a.close()

"""Site gateways over real Mosquittos: a central broker and two site brokers bridged to it by
broker_config/site-gateway.conf, a gateway (shard worker) and two agents at each site, the
coordinator on the central broker. The global model is the one a single aggregator makes of
the same updates, and no update crosses a site's uplink."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fedge.fleet.gatewayrun import gateway_run, site_bridge, site_gateway_config, wait_bridged
from fedge.fleet.shardrun import replay_single
from mosquitto import MosquittoServer

pytestmark = [pytest.mark.broker, pytest.mark.slow]
SITES = ("site-a", "site-b")


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[tuple[MosquittoServer, dict[str, MosquittoServer]]]:
    """The central broker and one site broker per site, each bridged to the central one."""
    text = site_gateway_config().read_text()
    for name in ("central", *SITES):
        (tmp_path / name).mkdir()
    with MosquittoServer(workdir=tmp_path / "central") as central:
        sites = {}
        try:
            for site in SITES:
                bridge = site_bridge(text, site, f"{central.host}:{central.port}")
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

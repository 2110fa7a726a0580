"""Secure aggregation and compact globals through the production broker: TLS, the ACL that
`fedge provision` writes (no anonymous access), a signing aggregator and three agents from
their provisioning bundles. The key lists, shares and survivors travel on the signed
``secagg`` topics and the model deltas on ``global/delta``, which the ACL must grant (a
missing grant would stall every round). Asserted: every round completes with every device's
masked update unmasked in the sum, the first model comes from the devices' installed model
file, later ones as deltas, and every device ends with the aggregator's copy bit for bit.
One device is quiet: its rounds and model deltas come on its own ``inbox/{device}``, which
the ACL must grant to it alone, and no broadcast round or model reaches it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fedge.agent.daemon import Agent
from fedge.agent.service import build_agent
from fedge.aggregator.config import AggregatorConfig
from fedge.aggregator.service import build_aggregator
from fedge.aggregator.strategies.config import StrategyConfig
from fedge.protocol import GateSettings, TrainingConfig
from helpers import DIGITS_MODEL, digits_partitions
from test_secure_fleet import bundle_agent

from fedge.brokerconfig import BrokerTls, broker_link
from fedge.provision import init_fleet, provision_device

pytestmark = [pytest.mark.broker, pytest.mark.slow]
FLEET = "private"
ROUNDS = 3
DEVICES = ("dev-a", "dev-b", "dev-c")
QUIET = "dev-c"


def test_secure_rounds_and_model_deltas_pass_the_production_acl(tmp_path: Path) -> None:
    from mosquitto import MosquittoServer

    pki = tmp_path / "pki"
    init_fleet(pki, FLEET)
    for device in DEVICES:
        provision_device(pki, device, FLEET)
    parts, test = digits_partitions(tmp_path, len(DEVICES), seed=5)
    with MosquittoServer.production(pki) as broker:
        url = f"mqtts://127.0.0.1:{broker.tls_port}"
        agg_cfg = AggregatorConfig(
            fleet=FLEET,
            broker=url,
            client_id="aggregator",
            tls=BrokerTls(
                ca_file=pki / "ca.crt",
                cert_file=pki / "aggregator.crt",
                key_file=pki / "aggregator.key",
            ),
            signing_key=pki / "signing.key",
            model=DIGITS_MODEL,
            state_dir=tmp_path / "agg",
            rounds=ROUNDS,
            min_devices=len(DEVICES),
            round_timeout=60,
            training=TrainingConfig(
                epochs=1, batch_size=16, lr=0.1, codec="float32", gate=GateSettings(threshold=0)
            ),
            strategy=StrategyConfig(name="fedavg"),
            eval_data=test,
            secure={"clip": 0.05, "stage_timeout": 30},
            downlink={"codec": "int8", "resync_every": 100},
        )
        agg = build_aggregator(agg_cfg)
        agents: list[Agent] = []
        for device, data in zip(DEVICES, parts, strict=True):
            cfg = bundle_agent(pki / "devices" / device, url, data, tmp_path / device)
            cfg = cfg.model_copy(update={"quiet": device == QUIET})
            birth = Agent.birth(device, FLEET, quiet=cfg.quiet)
            link = broker_link(cfg.broker, cfg.device_id, cfg.tls, Agent.will(device, FLEET), birth)
            agents.append(build_agent(cfg, link=link))
        stop = threading.Event()
        agg.start()
        threads = [threading.Thread(target=agg.run, args=(stop,), daemon=True)]
        for agent in agents:
            agent.start()
            threads.append(threading.Thread(target=agent.run, args=(stop,), daemon=True))
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        # The quiet device holds the model its last round trained on: nothing after it.
        want = {a.device_id: ROUNDS - (a.device_id == QUIET) for a in agents}
        while time.monotonic() < deadline and not (
            agg.done and all(a.global_version == want[a.device_id] for a in agents)
        ):
            time.sleep(0.1)
        stop.set()
        for thread in threads:
            thread.join(15)
        for agent in agents:
            agent.stop()
        agg.link.close()
        agg.store.close()
    assert agg.done, f"the aggregator did not finish; log:\n{broker.log_tail()}"
    rounds = [json.loads(line) for line in agg_cfg.log_path.read_text().splitlines()]
    assert [(r["round"], r["status"]) for r in rounds] == [(i, "done") for i in (1, 2, 3)]
    for r in rounds:
        assert r["participants"] == list(DEVICES)
        assert r["secure"]["survivors"] == 3 and r["secure"]["advertised"] == 3
        assert r["downlink"]["sent"] == "delta"
    assert rounds[0]["bytes_down_per_device"] < rounds[1]["bytes_down_per_device"]  # v0: none
    assert agg.shadow is not None
    for r in rounds:
        assert list(r["bytes_down_by_device"]) == [QUIET] and r["sleeping"] == 0
    for agent in agents:
        assert agent.state.last_round == ROUNDS
        assert not {k: v for k, v in agent.stats.rejected.items() if k != "old_version"}
        if agent.device_id == QUIET:
            assert agent.global_version == ROUNDS - 1 and agent.quiet
            continue
        assert agent.global_version == ROUNDS
        for name, w in agg.shadow.weights.items():
            assert np.array_equal(agent.global_weights[name], w)
    assert rounds[-1]["accuracy"] > 0.3

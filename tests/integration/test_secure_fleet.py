"""A locked-down fleet end to end: broker_config/production.conf on a real Mosquitto (TLS, the
generated ACL, no anonymous access), a PKI from `fedge provision`, an aggregator that signs, and
four agents loaded from their provisioning bundles: three with their own client certificates,
one over the password listener.

Meanwhile "mallory", an identity with write access to ``round`` and ``global`` (a stolen or
misconfigured broker account: the ACL alone no longer protects the fleet), publishes a forged
global model and round announcement (unsigned, and signed with a key that is not pinned) and
replays an old signed global model. One agent lies about its sample count (10^9).

Asserted: every round completes with all four devices; every global model is exactly the
sample-weighted average of the deltas the devices sent, with the liar's weight clipped to its
provisioned cap; every forged and replayed message is refused and counted by every agent.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fedge.agent.config import AgentConfig
from fedge.agent.daemon import Agent
from fedge.agent.service import build_agent
from fedge.aggregator.config import AggregatorConfig, SampleLimits
from fedge.aggregator.service import build_aggregator
from fedge.aggregator.strategies.config import StrategyConfig
from fedge.protocol import (
    GateSettings,
    GlobalModelHeader,
    Link,
    RoundAnnouncement,
    SignatureError,
    Topics,
    TrainingConfig,
    UpdateHeader,
    decode,
    encode,
    sign,
    verify,
)
from fedge.protocol.signing import OVERHEAD, load_public_key
from helpers import DIGITS_MODEL, digits_partitions

from fedge.brokerconfig import BrokerTls, broker_link
from fedge.provision import init_fleet, provision_device

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = [pytest.mark.broker, pytest.mark.slow]
FLEET = "secure"
T = Topics(FLEET)
ROUNDS = 3
LIAR_CAP = 40  # the liar's provisioned max_samples; it declares 10^9


class LyingLink:
    """The liar's link: its updates claim 10^9 samples (everything else passes unchanged)."""

    def __init__(self, link: Link) -> None:
        self._link = link

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._link, name)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        if topic == T.update("dev-liar") and payload[:3] == b"FDG":
            d = decode(payload)
            assert isinstance(d.msg, UpdateHeader)
            payload = encode(d.msg.model_copy(update={"num_samples": 10**9}), d.tensors)
        self._link.publish(topic, payload, qos, retain)


def bundle_agent(bundle: Path, broker: str, data: Path, state: Path) -> AgentConfig:
    """The bundle's agent.toml as `fedge agent` reads it, but for this machine: the broker's
    test port, and the model, data and state paths (on a device they are under /opt, /var)."""
    raw = tomllib.loads((bundle / "agent.toml").read_text())
    assert raw["broker"].startswith("mqtts://") and raw["aggregator_keys"] == ["aggregator.pub"]
    raw |= {"broker": broker, "model": str(DIGITS_MODEL), "data": str(data), "seed": 0}
    raw["state_dir"] = str(state)
    return AgentConfig.model_validate(raw, context={"base_dir": bundle})


def test_signed_rounds_over_tls_with_acl_refuse_forgeries_and_cap_a_liar(tmp_path: Path) -> None:
    from mosquitto import MosquittoServer

    pki = tmp_path / "pki"
    init_fleet(pki, FLEET)
    provision_device(pki, "dev-a", FLEET)
    provision_device(pki, "dev-b", FLEET)
    provision_device(pki, "dev-p", FLEET, password=True)
    provision_device(pki, "dev-liar", FLEET, max_samples=LIAR_CAP)
    provision_device(pki, "mallory", FLEET)
    with (pki / "fedge.acl").open("a") as acl:  # mallory may also write round and global
        acl.write(
            f"\nuser mallory\ntopic write {T.round}\ntopic write {T.global_model}\n"
            f"topic read {T.updates}\n"  # and read the updates, to check the averages
        )
    parts, test = digits_partitions(tmp_path, 4, seed=3)
    with MosquittoServer.production(pki) as broker:
        urls = {
            "dev-a": f"mqtts://127.0.0.1:{broker.tls_port}",
            "dev-b": f"mqtts://127.0.0.1:{broker.tls_port}",
            "dev-p": f"mqtts://127.0.0.1:{broker.password_port}",
            "dev-liar": f"mqtts://127.0.0.1:{broker.tls_port}",
        }
        agg_cfg = AggregatorConfig(
            fleet=FLEET,
            broker=f"mqtts://127.0.0.1:{broker.tls_port}",
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
            min_devices=4,
            quorum=1.0,
            round_timeout=60,
            training=TrainingConfig(
                epochs=1, batch_size=16, lr=0.1, codec="float32", gate=GateSettings(threshold=0)
            ),
            strategy=StrategyConfig(name="fedavg"),
            samples=SampleLimits(registry=pki / "devices.json"),  # and 3x the median
            eval_data=test,
        )
        agg = build_aggregator(agg_cfg)
        agents: list[Agent] = []
        for device, data in zip(urls, parts, strict=True):
            cfg = bundle_agent(pki / "devices" / device, urls[device], data, tmp_path / device)
            link = broker_link(cfg.broker, cfg.device_id, cfg.tls, Agent.will(device, FLEET))
            agents.append(build_agent(cfg, link=LyingLink(link) if device == "dev-liar" else link))
        assert all(len(a.trusted_keys) == 1 for a in agents)

        # Mallory: a valid identity of the fleet CA that may write round and global.
        mallory = broker_link(
            urls["dev-a"],
            "mallory",
            BrokerTls(
                ca_file=pki / "ca.crt",
                cert_file=pki / "devices" / "mallory" / "device.crt",
                key_file=pki / "devices" / "mallory" / "device.key",
            ),
        )
        mallory.connect(timeout=10)
        mallory.subscribe(T.global_model)
        mallory.subscribe(T.updates)

        stop = threading.Event()
        agg.start()
        threads = [threading.Thread(target=agg.run, args=(stop,), daemon=True)]
        for agent in agents:
            agent.start()
            threads.append(threading.Thread(target=agent.run, args=(stop,), daemon=True))
        for thread in threads:
            thread.start()
        aggregator_key = load_public_key((pki / "signing.pub").read_bytes())
        attacked = False
        signed_v0: bytes | None = None
        globals_: dict[int, dict[str, np.ndarray]] = {}
        updates: dict[int, dict[str, dict[str, np.ndarray]]] = {}
        deadline = time.monotonic() + 150
        # Until the last model has reached every agent too, not only this observer.
        while time.monotonic() < deadline and not (
            agg.done and ROUNDS in globals_ and all(a.global_version == ROUNDS for a in agents)
        ):
            msg = mallory.get(0.2)
            if msg is None:
                continue
            if msg.topic != T.global_model:
                d = decode(msg.payload)
                assert isinstance(d.msg, UpdateHeader)
                updates.setdefault(d.msg.round_id, {})[d.msg.device_id] = d.tensors
                continue
            try:  # mallory hears her own forgeries too
                d = decode(verify(msg.payload, [aggregator_key], fleet=FLEET, kind="global"))
            except SignatureError:
                continue
            assert isinstance(d.msg, GlobalModelHeader)
            globals_[d.msg.model_version] = d.tensors
            signed_v0 = signed_v0 or (msg.payload if d.msg.model_version == 0 else None)
            if d.msg.model_version >= 1 and not attacked and signed_v0 is not None:
                attacked = True
                forge(mallory, signed_v0)
        stop.set()
        for thread in threads:
            thread.join(15)
        for agent in agents:
            agent.stop()
        agg.link.close()
        agg.store.close()
        mallory.close()
    assert agg.done, f"the aggregator did not finish; log:\n{broker.log_tail()}"
    assert attacked

    rounds = [json.loads(line) for line in agg_cfg.log_path.read_text().splitlines()]
    assert [(r["round"], r["status"]) for r in rounds] == [(i, "done") for i in (1, 2, 3)]
    for r in rounds:
        assert r["participants"] == ["dev-a", "dev-b", "dev-liar", "dev-p"]
        assert r["weights"]["dev-liar"] == LIAR_CAP
        assert r["samples_clipped"] == {"dev-liar": 10**9}
    # Every global is the weighted average of the deltas sent, the liar weighing LIAR_CAP.
    assert sorted(globals_) == [0, 1, 2, 3]
    for r in rounds:
        weights = r["weights"]
        held = math.ceil(0.1 * len(np.load(parts[0])["y"]))  # held out to evaluate
        assert weights["dev-a"] == len(np.load(parts[0])["y"]) - held
        total = sum(weights.values())
        prev, new = globals_[r["model_version"] - 1], globals_[r["model_version"]]
        sent = updates[r["round"]]
        for name in prev:
            expected = prev[name].astype(np.float64) + sum(
                sent[d][name].astype(np.float64) * weights[d] / total for d in weights
            )
            np.testing.assert_allclose(new[name], expected.astype(np.float32), rtol=0, atol=1e-6)
    assert rounds[-1]["accuracy"] > 0.5

    for agent in agents:
        rejected = agent.stats.rejected
        assert rejected["unsigned"] >= 2 and rejected["unknown_key"] >= 2, (
            agent.device_id,
            rejected,
        )
        assert rejected["old_version"] >= 1, (agent.device_id, rejected)
        assert agent.state.last_round == ROUNDS and agent.global_version == ROUNDS


def forge(mallory: Link, signed_v0: bytes) -> None:
    """What mallory sends: an unsigned all-zero global, a global and a round signed with her own
    key (the highest round id, 20 epochs), and the genuine signed v0 again (a replay)."""
    zeros = {k: np.zeros_like(v) for k, v in decode(signed_v0[OVERHEAD:]).tensors.items()}
    header = GlobalModelHeader(fleet=FLEET, model_version=999, round_id=999)
    mallory.publish(T.global_model, encode(header, zeros), retain=False)
    own = Ed25519PrivateKey.generate()
    mallory.publish(
        T.global_model,
        sign(encode(header, zeros), own, fleet=FLEET, kind="global"),
        retain=False,
    )
    ann = RoundAnnouncement(
        fleet=FLEET,
        round_id=2**32 - 1,
        model_version=1,
        deadline=time.time() + 60,
        selected=("dev-a", "dev-b", "dev-p", "dev-liar"),
        config=TrainingConfig(epochs=20),
    )
    mallory.publish(T.round, sign(encode(ann), own, fleet=FLEET, kind="round"), retain=False)
    mallory.publish(T.round, encode(ann), retain=False)  # and unsigned
    mallory.publish(T.global_model, signed_v0, retain=False)

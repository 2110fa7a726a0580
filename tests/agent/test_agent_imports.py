"""What a device's agent loads (bench/README.md, "Agent footprint"): the agent path imports
only what its configured path needs. Secure aggregation, homomorphic encryption, the serial
path (pyserial, SQLite) and Prometheus are imported when a round, or the config, asks for
them; the aggregator, the fleet tools and the heavy libraries never."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fedge.models.runtime import load_runtime
from fedge.protocol import (
    GateSettings,
    GlobalModelHeader,
    RoundAnnouncement,
    SecureSettings,
    TrainingConfig,
    encode,
    sign,
)
from fedge.protocol.signing import public_pem, verify_key
from helpers import DIGITS_MODEL

# Never on a device: the build and simulation stacks, the server side.
NEVER = (
    "tensorflow",
    "keras",
    "sklearn",
    "scipy",
    "matplotlib",
    "pandas",
    "dp_accounting",
    "tenseal",
    "amqtt",
    "progpy",
    "rich",
    "tqdm",
    "fedge.aggregator",
    "fedge.fleet",
)
# Only when the configured path (or a round) needs them.
LAZY = (
    "fedge.protocol.secagg",  # a secure round
    "fedge.agent.secure",
    "fedge.protocol.he",  # homomorphic encryption: [he] key_file, or an encrypted model
    "fedge.agent.sensor_source",  # [serial]
    "fedge.agent.store",
    "fedge.firmware_bridge",
    "serial",
    "sqlite3",
    "prometheus_client",  # metrics_port
    "fedge.metrics",
    # Secure aggregation's X25519 and ChaCha20 (and the aggregator's signing key, provisioning):
    # signed rounds verify with PyNaCl.
    "cryptography",
)


def loaded(names: list[str], wanted: tuple[str, ...]) -> list[str]:
    return sorted(m for m in names if any(m == w or m.startswith(w + ".") for w in wanted))


def run(code: str, *args: str) -> Any:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.unit
def test_the_agent_path_imports_nothing_its_config_does_not_need() -> None:
    modules = run(
        "import json, sys, fedge.cli, fedge.agent.config, fedge.agent.service,"
        " fedge.agent.daemon, fedge.protocol.paho_link; print(json.dumps(sorted(sys.modules)))"
    )
    assert {"numpy", "pydantic", "fedge.agent.daemon", "fedge.protocol.signing"} <= set(modules)
    assert "nacl.signing" in modules  # the verifier of signed rounds and models
    assert loaded(modules, NEVER) == []
    assert loaded(modules, LAZY) == []


AGENT = """
import json, sys
import numpy as np
from pathlib import Path
from fedge.agent.config import AgentConfig
from fedge.agent.service import build_agent
from fedge.protocol import MemoryBroker, MemoryLink, Topics

tmp = Path(sys.argv[1])
rng = np.random.default_rng(0)
np.savez(tmp / "data.npz", x=rng.random((40, 64), np.float32), y=rng.integers(0, 10, 40))
cfg = AgentConfig(device_id="d1", fleet="f", model=sys.argv[2], data=tmp / "data.npz",
                  state_dir=tmp, runtime=("numpy",), aggregator_keys=(tmp / "aggregator.pub",))
broker = MemoryBroker()
server = MemoryLink(broker, "server")
server.connect()
server.subscribe(Topics("f").updates)
agent = build_agent(cfg, MemoryLink(broker, "d1"))
agent.start()
server.publish(Topics("f").global_model, (tmp / "global").read_bytes(), retain=True)
seen = []
for name in ("round-plain", "round-secure"):
    server.publish(Topics("f").round, (tmp / name).read_bytes(), retain=True)
    while agent.step(0):
        pass
    sent = 0
    while (msg := server.get(0)) is not None:
        sent += msg.topic == Topics("f").update("d1")
    seen.append({"sent": sent, "refused": sum(agent.stats.rejected.values()),
                 "modules": sorted(sys.modules)})
print(json.dumps(seen))
"""


def signed_fleet(tmp_path: Path) -> None:
    """What the child's agent is sent, signed here with the aggregator's key (cryptography,
    as the aggregator does): its public key, the global model, a plain and a secure round."""
    key = Ed25519PrivateKey.generate()
    (tmp_path / "aggregator.pub").write_bytes(public_pem(verify_key(key)))
    weights = load_runtime(DIGITS_MODEL, prefer=("numpy",)).get_weights()
    model = encode(GlobalModelHeader(fleet="f", model_version=1, round_id=0), weights)
    (tmp_path / "global").write_bytes(sign(model, key, fleet="f", kind="global"))
    plain = TrainingConfig(
        epochs=1,
        batch_size=8,
        lr=0.1,
        codec="float32",
        gate=GateSettings(threshold=0),
        eval_fraction=0,
    )
    secure = plain.model_copy(update={"secure": SecureSettings(seed="ab" * 32, clip=0.05, bits=8)})
    for round_id, (name, config) in enumerate((("plain", plain), ("secure", secure)), 1):
        ann = RoundAnnouncement(
            fleet="f",
            round_id=round_id,
            model_version=1,
            deadline=2e9,
            selected=("d1", "d2", "d3"),
            config=config,
        )
        (tmp_path / f"round-{name}").write_bytes(sign(encode(ann), key, fleet="f", kind="round"))


@pytest.mark.link
def test_signed_rounds_need_no_cryptography_until_a_secure_round_selects_the_device(
    tmp_path: Path,
) -> None:
    signed_fleet(tmp_path)
    plain, secure = run(AGENT, str(tmp_path), str(DIGITS_MODEL))
    assert plain["sent"] == 1 and plain["refused"] == 0  # the signed plain round verified,
    assert "nacl.signing" in plain["modules"]  # with PyNaCl, trained and sent its update ...
    assert loaded(plain["modules"], LAZY) == []  # ... with none of the lazy modules (cryptography)
    assert secure["sent"] == 1  # the secure round: the device advertised its keys ...
    secagg = ("fedge.protocol.secagg", "fedge.agent.secure", "cryptography")
    assert set(secagg) <= set(
        loaded(secure["modules"], secagg)
    )  # ... and loaded secure aggregation
    assert loaded(secure["modules"], NEVER) == []
    assert "fedge.protocol.he" not in secure["modules"]

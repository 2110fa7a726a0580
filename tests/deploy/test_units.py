"""The unit files: `systemd-analyze verify` finds nothing wrong, and the hardening score holds.

verify checks that ExecStart's binary exists and is executable, and /opt/fedge/venv is not
installed here, so each unit is verified as a copy whose ExecStart names a stub script; nothing
else in it changes. systemd-analyze 252 exits 0 on an unknown key or a bad value and only logs
it, so any line it prints counts as a problem too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fedge.configfile import EX_CONFIG

pytestmark = pytest.mark.unit

UNITS = Path(__file__).resolve().parents[2] / "systemd"
FEDGE = "/opt/fedge/venv/bin/fedge"
# `systemd-analyze security --offline=yes` scores when the units were last hardened; lower is
# better (0-10). deploy/README.md records them.
MAX_EXPOSURE = {
    "fedge-agent.service": 1.9,
    "fedge-aggregator.service": 1.7,
    "fedge-aggregator-worker@.service": 1.7,  # a template: verified and scored as instance "i"
}


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail(
            "systemd-analyze is missing: apt-get install systemd "
            "(make test does it as root, through deploy/ensure-tools.sh)"
        )
    env = dict(os.environ, SYSTEMD_COLORS="0", SYSTEMD_PAGER="", LC_ALL="C.UTF-8")
    return subprocess.run(
        [exe, *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        timeout=120,
    )


def verify(name: str, text: str, folder: Path) -> list[str]:
    """What `systemd-analyze verify` says about unit NAME with TEXT: [] when nothing."""
    stub = folder / "fedge"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit = folder / name
    unit.write_text(text.replace(FEDGE, str(stub)))
    proc = analyze("verify", "--man=no", str(unit))
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    if proc.returncode != 0 and not problems:
        problems = [f"systemd-analyze verify exited {proc.returncode}"]
    return problems


@pytest.mark.parametrize("name", sorted(MAX_EXPOSURE))
def test_unit_verifies(name: str, tmp_path: Path) -> None:
    text = (UNITS / name).read_text()
    assert f"ExecStart={FEDGE} " in text
    assert verify(name, text, tmp_path) == []


@pytest.mark.parametrize(
    ("change", "reported"),
    [
        (("NoNewPrivileges=yes", "NoNewPrivileges=yes\nFrobnicate=yes"), "Unknown key"),
        (("\nRestart=on-failure\n", "\nRestart=sometimes\n"), "restart specifier"),
        ((FEDGE, "/nonexistent/fedge"), "/nonexistent/fedge"),
    ],
)
def test_verify_reports_a_broken_unit(
    change: tuple[str, str], reported: str, tmp_path: Path
) -> None:
    text = (UNITS / "fedge-agent.service").read_text()
    assert change[0] in text
    problems = verify("fedge-agent.service", text.replace(change[0], change[1], 1), tmp_path)
    assert any(reported in line for line in problems), problems


@pytest.mark.parametrize("name", sorted(MAX_EXPOSURE))
def test_exposure_score(name: str) -> None:
    proc = analyze("security", "--offline=yes", "--no-pager", str(UNITS / name))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"Overall exposure level for (\S+): (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert match[1] == name.replace("@.", "@i.")
    assert float(match[2]) <= MAX_EXPOSURE[name], proc.stdout


@pytest.mark.parametrize("name", sorted(MAX_EXPOSURE))
def test_bad_config_does_not_restart_for_ever(name: str) -> None:
    lines = (UNITS / name).read_text().splitlines()
    service = lines[lines.index("[Service]") : lines.index("[Install]")]
    assert "Restart=on-failure" in service
    assert f"RestartPreventExitStatus={EX_CONFIG}" in service


def hardening(name: str) -> list[str]:
    """The settings of a unit from its "# Hardening" comment to [Install], comments left out."""
    lines = (UNITS / name).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Hardening"))
    return [ln for ln in lines[start : lines.index("[Install]")] if not ln.startswith("#")]


def test_the_worker_unit_runs_its_instance_hardened_as_the_aggregator() -> None:
    worker = "fedge-aggregator-worker@.service"
    text = (UNITS / worker).read_text()
    assert f"ExecStart={FEDGE} aggregator --config /etc/fedge/aggregator.toml --worker %i\n" in text
    assert "StateDirectory=fedge-aggregator\n" in text and "User=fedge\n" in text
    assert hardening(worker) == hardening("fedge-aggregator.service")
    assert "NoNewPrivileges=yes" in hardening(worker)


def unit_bytes(value: str) -> int:
    """A systemd size (``192M``, ``1G``, plain bytes) in bytes."""
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(value[:-1]) * scale[value[-1]] if value[-1] in scale else int(value)


def service_setting(name: str, key: str) -> str:
    lines = (UNITS / name).read_text().splitlines()
    found = [ln.split("=", 1)[1] for ln in lines if ln.startswith(key + "=")]
    assert len(found) == 1, f"{name}: {key}= set {len(found)} times"
    return found[0]


# The child: an agent that loads everything its config or a round may ask for (a secure
# round's cryptography, Prometheus metrics, the serial path, HE where TenSEAL installs), trains
# the 50k digits model on LiteRT and does an HE round's device work on it: decrypt the global
# model, encrypt the update. It prints its VmHWM in bytes.
HEAVIEST_AGENT = """
import sys
from pathlib import Path
import numpy as np
import fedge.agent.service, fedge.protocol.paho_link
import fedge.agent.secure, fedge.protocol.secagg, fedge.metrics, fedge.agent.sensor_source
from fedge.models.runtime import load_runtime, read_model
model, keys = Path(sys.argv[1]), Path(sys.argv[2])
rt = load_runtime(read_model(model), prefer=("litert",))
x_shape, y_shape, y_dtype = rt.example_shapes()
x, y = np.zeros((32, *x_shape), np.float32), np.zeros((32, *y_shape), y_dtype)
for _ in range(20):
    rt.train_step(x, y, 0.01)
weights = rt.get_weights()
if keys.exists():
    from fedge.protocol import he
    device = he.keys_from_bytes(keys.read_bytes(), secret=True)
    shapes = {name: w.shape for name, w in weights.items()}
    got = he.decrypt_model(device, (keys.parent / "model.he").read_bytes(), shapes)
    rt.set_weights(got)
    he.encrypt_update(device, weights, 100.0)
for line in Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]) * 1024)
"""


@pytest.mark.slow
def test_the_agent_memory_cap_leaves_room_for_the_heaviest_agent(tmp_path: Path) -> None:
    """MemoryHigh= (reclaim and slow down) is at least 1.5x the peak RSS of an agent that loads
    everything it may, and MemoryMax= (kill and restart) is above MemoryHigh=."""
    import sys

    from fedge.protocol import he

    name = "fedge-agent.service"
    high = unit_bytes(service_setting(name, "MemoryHigh"))
    assert unit_bytes(service_setting(name, "MemoryMax")) > high
    model = UNITS.parent / "models" / "artifacts" / "digits_mlp_50k.tflite"
    secret = tmp_path / "he.secret"
    if he.available():  # the he extra installs where TenSEAL has wheels (pyproject.toml)
        from fedge.models.runtime import load_runtime, read_model

        files = he.generate_keys()
        secret.write_bytes(files.secret)
        weights = load_runtime(read_model(model), prefer=("numpy",)).get_weights()
        public = he.keys_from_bytes(files.public, secret=False)
        (tmp_path / "model.he").write_bytes(he.encrypt_model(public, weights))
    proc = subprocess.run(
        [sys.executable, "-c", HEAVIEST_AGENT, str(model), str(secret)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OPENBLAS_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stdout.split()[-1])
    assert peak * 1.5 <= high, f"peak RSS {peak / 2**20:.1f} MiB against MemoryHigh={high}"

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

"""deploy/ansible: the playbook parses, and a run on this machine provisions and stages a device.

Ansible writes only under the test's temporary folder: ANSIBLE_HOME, its local and remote temp
folders, TMPDIR and HOME all point there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = REPO / "deploy" / "ansible" / "site.yml"
INVENTORY = REPO / "deploy" / "ansible" / "inventory.ini"

# Stands in for `fedge provision` on the control node: the bundle layout of the provisioning
# contract, so the playbook's hand-over (bundle -> host -> install.sh) is what is tested.
FAKE_PROVISION = """#!/bin/sh
set -eu
[ "$1" = provision ] || exit 2
shift
echo "$*" >>"$(dirname "$0")/provision.log"
init=0
[ "$1" = --init ] && init=1 && shift
[ "$init" -eq 1 ] || { id=$1; shift; }
while [ $# -gt 0 ]; do
    case $1 in --dir) dir=$2; shift ;; --fleet) fleet=$2; shift ;; esac
    shift
done
if [ "$init" -eq 1 ]; then mkdir -p "$dir"; echo CA >"$dir/ca.crt"; exit 0; fi
b=$dir/devices/$id
mkdir -p "$b"
printf 'device_id = "%s"\\nfleet = "%s"\\nmodel = "/opt/fedge/models/digits_mlp.tflite"\\n' \\
    "$id" "$fleet" >"$b/agent.toml"
for f in device.crt ca.crt aggregator.pub; do echo "$f" >"$b/$f"; done
echo key >"$b/device.key"
chmod 600 "$b/device.key"
"""


def ansible(tool: str, *args: str | Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / tool
    if not exe.is_file():
        pytest.fail(f"{exe} is missing: ansible-core is in the dev extra (make test installs it)")
    home, temp = tmp / "home", tmp / "tmp"
    home.mkdir(exist_ok=True)
    temp.mkdir(exist_ok=True)
    env = dict(
        os.environ,
        HOME=str(home),
        TMPDIR=str(temp),
        ANSIBLE_HOME=str(tmp / "ansible"),
        ANSIBLE_LOCAL_TEMP=str(tmp / "ansible" / "tmp"),
        ANSIBLE_REMOTE_TEMP=str(tmp / "ansible" / "remote-tmp"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_RETRY_FILES_ENABLED="0",
    )
    proc = subprocess.run(
        [str(exe), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,  # no ansible.cfg from wherever pytest was started
        timeout=300,
    )
    assert list(home.iterdir()) == []
    return proc


def test_syntax_check(tmp_path: Path) -> None:
    proc = ansible("ansible-playbook", "--syntax-check", "-i", INVENTORY, PLAYBOOK, tmp=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_syntax_check_fails_on_a_broken_playbook(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("- hosts: all\n  tasks:\n    - ansible.builtin.nosuchmodule: {}\n")
    proc = ansible("ansible-playbook", "--syntax-check", "-i", INVENTORY, broken, tmp=tmp_path)
    assert proc.returncode != 0 and "nosuchmodule" in proc.stdout + proc.stderr


def fake_cli(tmp_path: Path) -> Path:
    cli = tmp_path / "fedge"
    cli.write_text(FAKE_PROVISION)
    cli.chmod(0o755)
    return cli


def test_the_broker_host_is_required(tmp_path: Path) -> None:
    """Without fedge_broker_host the broker certificate and every bundle would name localhost:
    the playbook stops at its first task, before provisioning anything."""
    cli = fake_cli(tmp_path)
    inventory = tmp_path / "inventory.ini"
    inventory.write_text("[fedge_devices]\nbench-01 ansible_connection=local\n")
    extra = {"ansible_python_interpreter": sys.executable, "fedge_cli": str(cli)}
    args = ("-i", inventory, "-e", json.dumps(extra), PLAYBOOK)
    proc = ansible("ansible-playbook", *args, tmp=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "set fedge_broker_host to the name (or IPv4 address) devices reach the broker" in (
        proc.stdout
    )
    assert not (cli.parent / "provision.log").exists()


def test_a_device_behind_a_site_gateway_is_provisioned_for_its_site(tmp_path: Path) -> None:
    """fedge_site: the device goes on its site broker (`--site`), not the central one
    (`--broker-host`). Only the tasks tagged provision run (the control node's part)."""
    cli = fake_cli(tmp_path)
    inventory = tmp_path / "inventory.ini"
    inventory.write_text(
        "[fedge_devices]\nbench-01 ansible_connection=local\n"
        "shed-01 ansible_connection=local fedge_site=site-a\n"
    )
    pki = tmp_path / "pki"
    extra = {
        "ansible_python_interpreter": sys.executable,
        "fedge_cli": str(cli),
        "fedge_fleet": "bench",
        "fedge_broker_host": "broker.test",
        "fedge_pki_dir": str(pki),
        # Where the rest would install, were it run.
        "ansible_become": False,
        "fedge_stage_dir": str(tmp_path / "stage"),
        "fedge_install_args": ["--destdir", str(tmp_path / "root")],
        "fedge_apt_packages": [],
    }
    args = ("-i", inventory, "-e", json.dumps(extra), "--tags", "provision", PLAYBOOK)
    proc = ansible("ansible-playbook", *args, tmp=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted((cli.parent / "provision.log").read_text().splitlines()) == [
        f"--init --fleet bench --dir {pki} --server-name broker.test",
        f"bench-01 --fleet bench --dir {pki} --broker-host broker.test",
        f"shed-01 --fleet bench --dir {pki} --site site-a",
    ]
    assert not (tmp_path / "stage").exists() and not (tmp_path / "root").exists()


@pytest.mark.slow
def test_playbook_provisions_and_stages_a_device(tmp_path: Path) -> None:
    """The whole playbook against this machine (a local connection, no become), with
    install.sh staging into a folder and a stand-in for `fedge provision`; run twice, then
    once more with a file in the staged bundle that the bundle no longer has."""
    cli = fake_cli(tmp_path)
    source = tmp_path / "src"  # a still copy of the source: the checkout may change meanwhile
    for part in ("pyproject.toml", "models/artifacts"):  # what install.sh reads there
        dest = source / part
        dest.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-R", str(REPO / part), str(dest)], check=True)
    inventory = tmp_path / "inventory.ini"
    inventory.write_text("[fedge_devices]\nbench-01 ansible_connection=local\n")
    root, stage = tmp_path / "root", tmp_path / "stage"
    pki = source / "secrets" / "pki"  # inside the source: must not travel with it
    extra = {
        "ansible_become": False,
        "ansible_python_interpreter": sys.executable,
        "fedge_cli": str(cli),
        "fedge_fleet": "bench",
        "fedge_broker_host": "broker.test",
        "fedge_pki_dir": str(pki),
        "fedge_source": str(source),
        "fedge_stage_dir": str(stage),
        "fedge_install_args": ["--destdir", str(root)],
        "fedge_apt_packages": [],
    }
    args = ("-i", inventory, "-e", json.dumps(extra), PLAYBOOK)
    first = ansible("ansible-playbook", *args, tmp=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    bundle = pki / "devices" / "bench-01"
    assert (root / "etc/fedge/agent.toml").read_bytes() == (bundle / "agent.toml").read_bytes()
    assert (root / "etc/fedge/device.key").read_text() == "key\n"
    assert (root / "opt/fedge/models/digits_mlp.tflite").is_file()
    assert (root / "etc/systemd/system/fedge-agent.service").is_file()
    assert (stage / "src/pyproject.toml").is_file() and not (stage / "src/secrets/pki").exists()
    assert (cli.parent / "provision.log").read_text().splitlines() == [
        f"--init --fleet bench --dir {pki} --server-name broker.test",
        f"bench-01 --fleet bench --dir {pki} --broker-host broker.test",
    ]
    second = ansible("ansible-playbook", *args, tmp=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "changed=0" in second.stdout, second.stdout  # provisioned once; nothing to redo

    # An earlier bundle had a password; the re-provisioned one (--force) has none.
    stale = stage / "bundle" / "password"
    stale.write_text("old secret")
    third = ansible("ansible-playbook", *args, tmp=tmp_path)
    assert third.returncode == 0, third.stdout + third.stderr
    assert not stale.exists() and not (root / "etc/fedge/password").exists()
    assert sorted(p.name for p in (stage / "bundle").iterdir()) == sorted(
        p.name for p in bundle.iterdir()
    )

"""deploy/install.sh staged into a temporary root: what it installs; a rerun changes nothing.

Staging (``--destdir``) installs the models, the config or bundle, and the unit, and only prints
what needs the real system (users, chown, systemctl, the venv's pip install), so these tests run
unprivileged and offline.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fedge.agent.config import AgentConfig
from fedge.aggregator.config import AggregatorConfig

from fedge.configfile import load_config
from fedge.provision import init_fleet, provision_device

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "deploy" / "install.sh"
SHIPPED = sorted(p.name for p in (REPO / "models" / "artifacts").glob("*.tflite"))
DEVICE, FLEET = "pi-test-01", "test"


def install(
    *args: str | Path, source: Path = REPO, env: dict[str, str] | None = None, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "DESTDIR"} | (env or {})
    proc = subprocess.run(
        ["sh", str(INSTALL), *map(str, args), str(source)],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
    )
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def snapshot(root: Path) -> dict[str, tuple[int, int, int, int, str]]:
    """Every path under root: mode, inode, mtime, ctime and a hash of the bytes."""
    tree = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        tree[str(path.relative_to(root))] = (
            st.st_mode,
            st.st_ino,
            st.st_mtime_ns,
            st.st_ctime_ns,
            digest,
        )
    return tree


def make_bundle(
    tmp: Path, model: str | None = None, *, password: bool = False, serial: str | None = None
) -> Path:
    """A real bundle of DEVICE from `fedge provision` (its PKI in tmp/pki): agent.toml with
    mqtts://, [tls] and aggregator_keys; a certificate and key the fleet CA signed, the CA
    certificate, the aggregator's Ed25519 public key, and with ``password`` a password file.
    ``model`` is a file name in /opt/fedge/models/; ``serial`` a sensor port instead of data."""
    pki = tmp / "pki"
    if not pki.exists():
        init_fleet(pki, FLEET)
    provision_device(
        pki, DEVICE, FLEET, force=True, model=model, password=password, serial_port=serial
    )
    return pki / "devices" / DEVICE


def rerooted(config: Path, root: Path) -> Path:
    """A copy of an installed config, beside it, whose absolute paths point into the root.

    The config names paths on the device (/opt/fedge/models/...); the staging root stands for
    that device's /, so each absolute path is read under it, as a chroot would. The copy sits in
    the same folder, so relative paths (the TLS files beside it) resolve as on the device.
    """
    text = re.sub(r'^(\w+\s*=\s*")/', rf"\g<1>{root}/", config.read_text(), flags=re.MULTILINE)
    copy = config.with_name("rerooted-" + config.name)
    copy.write_text(text)
    return copy


def device_data(root: Path) -> None:
    """The device's own training data: not install.sh's to provide, so the test puts it there."""
    (root / "var/lib/fedge").mkdir(parents=True)
    np.savez(
        root / "var/lib/fedge/partition.npz",
        x=np.zeros((4, 64), np.float32),
        y=np.zeros(4, np.int32),
    )


def test_second_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    bundle = make_bundle(tmp_path)
    first = install("--destdir", root, "--bundle", bundle)
    before = snapshot(root)
    second = install("--destdir", root, "--bundle", bundle)
    assert snapshot(root) == before
    assert "change(s) made" in first.stdout
    assert second.stdout.splitlines()[-1] == "install.sh: nothing changed"
    # What needs the real system was recorded, not done.
    recorded = [line for line in second.stdout.splitlines() if "staging, not run: " in line]
    for step in ("useradd ", "chown root:fedge ", "systemctl daemon-reload", "-m pip install "):
        assert any(step in line for line in recorded), step
    assert not (root / "opt/fedge/venv").exists()


def test_installs_models_unit_and_bundle(tmp_path: Path) -> None:
    root = tmp_path / "root"
    bundle = make_bundle(tmp_path)
    install("--destdir", root, "--bundle", bundle)
    models = root / "opt/fedge/models"
    assert sorted(p.name for p in models.iterdir()) == SHIPPED
    for name in SHIPPED:
        assert (models / name).read_bytes() == (REPO / "models/artifacts" / name).read_bytes()
    unit = root / "etc/systemd/system/fedge-agent.service"
    assert unit.read_bytes() == (REPO / "systemd/fedge-agent.service").read_bytes()
    etc = root / "etc/fedge"
    for name in ("agent.toml", "device.crt", "device.key", "ca.crt", "aggregator.pub"):
        assert (etc / name).read_bytes() == (bundle / name).read_bytes()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [etc, *etc.iterdir()]}
    # The service (user fedge) reads the config and key through group fedge; nobody else can.
    assert modes == {
        "fedge": 0o750,
        "certs": 0o750,
        "agent.toml": 0o640,
        "device.key": 0o640,
        "device.crt": 0o644,
        "ca.crt": 0o644,
        "aggregator.pub": 0o644,
    }
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644


def test_the_he_secret_key_is_for_the_service_only(tmp_path: Path) -> None:
    pytest.importorskip("tenseal", reason="the he extra is not installed")
    from fedge.provision import init_he_keys

    root = tmp_path / "root"
    init_fleet(tmp_path / "pki", FLEET)
    init_he_keys(tmp_path / "pki")
    bundle = make_bundle(tmp_path)
    install("--destdir", root, "--bundle", bundle)
    secret = root / "etc/fedge/he.secret"
    assert secret.read_bytes() == (bundle / "he.secret").read_bytes()
    assert stat.S_IMODE(secret.stat().st_mode) == 0o640


@pytest.mark.parametrize("kind", ["certificate", "password", "serial sensor"])
def test_installed_bundle_config_loads(tmp_path: Path, kind: str) -> None:
    """A provisioned bundle, installed twice, is a config the agent accepts: its [tls] files,
    aggregator key and model are where it says, with the bundle's bytes."""
    root, etc = tmp_path / "root", tmp_path / "root/etc/fedge"
    bundle = make_bundle(
        tmp_path,
        password=kind == "password",
        serial="/dev/ttyACM0" if kind == "serial sensor" else None,
    )
    install("--destdir", root, "--bundle", bundle)
    before = snapshot(root)
    again = install("--destdir", root, "--bundle", bundle)
    assert snapshot(root) == before
    assert again.stdout.splitlines()[-1] == "install.sh: nothing changed"
    if kind != "serial sensor":
        device_data(root)

    cfg = load_config(rerooted(etc / "agent.toml", root), AgentConfig)

    model = "machine_forecaster.tflite" if kind == "serial sensor" else "digits_mlp.tflite"
    assert cfg.model == root / "opt/fedge/models" / model
    assert cfg.model.read_bytes() == (REPO / "models/artifacts" / model).read_bytes()
    assert cfg.device_id == DEVICE and cfg.fleet == FLEET
    assert cfg.state_dir == root / "var/lib/fedge"
    assert cfg.broker.startswith("mqtts://localhost:")
    assert cfg.aggregator_keys == (etc / "aggregator.pub",)
    assert cfg.tls is not None and cfg.tls.ca_file == etc / "ca.crt"
    if kind == "password":
        assert cfg.tls.password_file == etc / "password" and cfg.tls.cert_file is None
        assert stat.S_IMODE((etc / "password").stat().st_mode) == 0o640
    else:
        assert (cfg.tls.cert_file, cfg.tls.key_file) == (etc / "device.crt", etc / "device.key")
    for path in (cfg.tls.ca_file, cfg.tls.cert_file, cfg.tls.password_file, *cfg.aggregator_keys):
        if path is not None:
            assert path.read_bytes() == (bundle / path.name).read_bytes()
    assert (cfg.data is None) == (kind == "serial sensor")


DATA_WARNING = (
    "install.sh: warning: {root}/etc/fedge/agent.toml: data {root}/var/lib/fedge/partition.npz"
    " does not exist; the agent will not start until it does (or until the config reads a"
    " [serial] sensor instead)"
)


def test_a_site_gateways_worker_installs_with_its_unit_template(tmp_path: Path) -> None:
    pki, root = tmp_path / "pki", tmp_path / "root"
    init_fleet(pki, FLEET)
    provision_device(pki, "site-a", FLEET, site_gateway=True)
    bundle = pki / "devices" / "site-a"
    first = install("--destdir", root, "--role", "worker", "--worker", "site-a", "--bundle", bundle)
    assert "staging, not run: systemctl daemon-reload" in first.stdout
    unit = root / "etc/systemd/system/fedge-aggregator-worker@.service"
    assert unit.read_bytes() == (REPO / "systemd/fedge-aggregator-worker@.service").read_bytes()
    etc = root / "etc/fedge"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in etc.iterdir()}
    assert modes == {
        "certs": 0o750,
        "aggregator.toml": 0o640,
        "worker.key": 0o640,
        "worker.crt": 0o644,
        "ca.crt": 0o644,
        "aggregator.pub": 0o644,
    }
    cfg = load_config(rerooted(etc / "aggregator.toml", root), AggregatorConfig)
    assert cfg.shards is not None and cfg.shards.workers == ["site-a"]
    assert cfg.signing_key is None and cfg.aggregator_keys == (etc / "aggregator.pub",)
    before = snapshot(root)
    again = install("--destdir", root, "--role", "worker", "--worker", "site-a", "--bundle", bundle)
    assert snapshot(root) == before and again.stdout.splitlines()[-1].endswith("nothing changed")
    enabled = install(
        "--destdir", tmp_path / "r2", "--role", "worker", "--worker", "w1", "--enable"
    )
    assert "systemctl enable --now fedge-aggregator-worker@w1.service" in enabled.stdout
    example = (tmp_path / "r2/etc/fedge/aggregator.toml").read_text()
    assert '[shards]\nworkers = ["w1"]\n' in example


def test_missing_device_data_is_a_warning(tmp_path: Path) -> None:
    """A bundle names the device's own training data, which install.sh does not provide: the
    install goes on and says, in one line, that the agent will not start without it."""
    root = tmp_path / "root"
    bundle = make_bundle(tmp_path)
    proc = install("--destdir", root, "--bundle", bundle)
    warnings = [line for line in proc.stdout.splitlines() if ": warning: " in line]
    assert warnings == [DATA_WARNING.format(root=root)]
    assert (root / "etc/fedge/agent.toml").read_bytes() == (bundle / "agent.toml").read_bytes()
    device_data(root)
    proc = install("--destdir", root, "--bundle", bundle)
    assert ": warning: " not in proc.stdout + proc.stderr


def test_no_data_warning_for_a_serial_sensor(tmp_path: Path) -> None:
    proc = install("--destdir", tmp_path / "root", "--bundle", make_bundle(tmp_path, serial="COM"))
    assert ": warning: " not in proc.stdout + proc.stderr


def test_example_config_names_an_installed_model(tmp_path: Path) -> None:
    root = tmp_path / "root"
    out = install(env={"DESTDIR": str(root)}).stdout  # the environment variable works too
    assert "wrote an example" in out
    # The model is in place; the example's data is the device's own, not there yet.
    assert [line for line in out.splitlines() if ": warning: " in line] == [
        DATA_WARNING.format(root=root)
    ]
    device_data(root)
    cfg = load_config(rerooted(root / "etc/fedge/agent.toml", root), AgentConfig)
    assert cfg.model.is_file() and cfg.model.parent == root / "opt/fedge/models"


def test_only_a_bundle_replaces_a_config(tmp_path: Path) -> None:
    root = tmp_path / "root"
    config = root / "etc/fedge/agent.toml"
    install("--destdir", root)
    config.write_text(config.read_text() + "# edited by the operator\n")
    edited = config.read_text()
    install("--destdir", root)  # the example never replaces an existing config
    assert config.read_text() == edited
    bundle = make_bundle(tmp_path)
    out = install("--destdir", root, "--bundle", bundle).stdout
    assert "replacing" in out
    assert config.read_bytes() == (bundle / "agent.toml").read_bytes()
    assert config.with_name("agent.toml.old").read_text() == edited


def test_bundle_may_carry_its_model(tmp_path: Path) -> None:
    root = tmp_path / "root"
    bundle = make_bundle(tmp_path, model="custom.tflite")
    (bundle / "custom.tflite").write_bytes(b"TFL3 custom")
    install("--destdir", root, "--bundle", bundle)
    assert (root / "opt/fedge/models/custom.tflite").read_bytes() == b"TFL3 custom"
    assert not (root / "etc/fedge/custom.tflite").exists()


def test_bundle_naming_a_missing_model_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    bundle = make_bundle(tmp_path, model="nope.tflite")
    proc = install("--destdir", root, "--bundle", bundle, ok=False)
    assert proc.returncode == 1
    assert "model /opt/fedge/models/nope.tflite is neither shipped" in proc.stderr
    assert not root.exists()


def test_models_from_a_wheel(tmp_path: Path) -> None:
    wheel = tmp_path / "fedge-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        name = "models/artifacts/digits_mlp.tflite"
        zf.write(REPO / name, f"fedge/{name}")
        zf.writestr("fedge/__init__.py", "")
    root = tmp_path / "root"
    install("--destdir", root, source=wheel)
    assert [p.name for p in (root / "opt/fedge/models").iterdir()] == ["digits_mlp.tflite"]


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    bundle = make_bundle(tmp_path)
    out = install("--dry-run", "--destdir", root, "--bundle", bundle).stdout
    assert not root.exists()
    assert f"+ install -m 0640 {bundle}/device.key {root}/etc/fedge/device.key" in out


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--role", "gateway"], "--role must be agent, aggregator or worker, not 'gateway'"),
        (["--role", "worker"], "--role worker needs --worker NAME (its name in [shards] workers)"),
        (["--role", "worker", "--worker", "a/b"], "--worker 'a/b': use 1-64 of A-Z a-z 0-9 _ . -"),
        (["--worker", "w1"], "--worker is for --role worker"),
        (["--frobnicate"], "unknown option --frobnicate (see --help)"),
        (["--bundle", "/nonexistent"], "no such bundle directory: /nonexistent"),
    ],
)
def test_bad_arguments_say_why(tmp_path: Path, args: list[str], reason: str) -> None:
    proc = install("--destdir", tmp_path / "root", *args, ok=False)
    assert proc.returncode == 1 and proc.stderr == f"install.sh: {reason}\n"
    assert not (tmp_path / "root").exists()

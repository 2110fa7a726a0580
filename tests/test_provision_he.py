"""fedge.provision.init_he_keys: the fleet's CKKS key files, the secret one in device bundles
only, the public one for the aggregator."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest
from fedge.protocol import he

from fedge.cli import main
from fedge.provision import (
    HE_PUBLIC,
    HE_SECRET,
    ProvisionError,
    init_fleet,
    init_he_keys,
    provision_device,
)

pytestmark = pytest.mark.unit


def test_device_bundles_get_the_secret_key_and_no_one_else(tmp_path: Path) -> None:
    pytest.importorskip("tenseal", reason=he.INSTALL_HINT)
    pki = tmp_path / "pki"
    init_fleet(pki, "f1")
    provision_device(pki, "before", "f1")
    written = {c.path.name for c in init_he_keys(pki)}
    assert written == {HE_SECRET, HE_PUBLIC}
    assert stat.S_IMODE((pki / HE_SECRET).stat().st_mode) == 0o600
    provision_device(pki, "dev-a", "f1")
    provision_device(pki, "gw", "f1", gateway=True)
    provision_device(pki, "ops", "f1", operator=True)
    bundle = pki / "devices" / "dev-a" / HE_SECRET
    assert bundle.read_bytes() == (pki / HE_SECRET).read_bytes()
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o600
    for other in ("before", "gw", "ops"):  # made before the keys, or not a training device
        assert not (pki / "devices" / other / HE_SECRET).exists()
    toml = (pki / "devices" / "dev-a" / "agent.toml").read_text()
    assert '[he]\nkey_file = "he.secret"' in toml  # the bundle's config uses it
    assert "[he]" not in (pki / "devices" / "before" / "agent.toml").read_text()
    device = he.load_keys(bundle, secret=True)
    server = he.load_keys(pki / HE_PUBLIC, secret=False)
    assert device.key_id == server.key_id and not server.has_secret
    with pytest.raises(ProvisionError, match="already has HE keys; use --force"):
        init_he_keys(pki)
    init_he_keys(pki, force=True)
    assert he.load_keys(pki / HE_PUBLIC, secret=False).key_id != device.key_id


def test_he_keys_need_a_fleet_and_tenseal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ProvisionError, match="run `fedge provision --init` first"):
        init_he_keys(tmp_path)
    init_fleet(tmp_path, "f1")
    monkeypatch.setitem(sys.modules, "tenseal", None)
    with pytest.raises(ProvisionError, match=r"pip install 'fedge\[he\]'") as info:
        init_he_keys(tmp_path)
    assert "\n" not in str(info.value) and not (tmp_path / HE_SECRET).exists()


def test_cli_makes_he_keys_with_init_or_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tenseal", reason=he.INSTALL_HINT)
    monkeypatch.chdir(tmp_path)
    assert main(["provision", "--init", "--he", "--fleet", "home"]) == 0
    assert f"wrote   fleet-pki/{HE_SECRET}" in capsys.readouterr().out
    assert main(["provision", "pi-1"]) == 0
    assert (tmp_path / "fleet-pki" / "devices" / "pi-1" / HE_SECRET).exists()
    assert main(["provision", "--he"]) == 2  # keys exist: --force to replace them
    assert "already has HE keys" in capsys.readouterr().err
    assert main(["provision", "--he", "--force"]) == 0
    assert "re-provision devices made before" in capsys.readouterr().out
    assert main(["provision", "pi-2", "--he"]) == 2
    assert "use it with --init, or alone" in capsys.readouterr().err


def test_cli_without_tenseal_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "tenseal", None)
    assert main(["provision", "--init", "--he", "--fleet", "home"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'fedge[he]'" in err
    assert not (tmp_path / "fleet-pki" / "ca.key").exists()

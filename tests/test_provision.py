"""fedge.provision and `fedge provision`: the PKI layout, certificates, ACL, passwords, revocation.

The broker's view of the same files is in tests/integration/test_production_broker.py.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import re
import shutil
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fedge.aggregator.config import AggregatorConfig

from fedge.cli import main
from fedge.provision import (
    ProvisionError,
    acl_text,
    bridge_conf_text,
    check_mosquitto_password,
    init_fleet,
    mosquitto_password_hash,
    provision_device,
    read_registry,
    revoke_device,
    site_acl_text,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parent.parent
KEYS = ("ca.key", "server.key", "aggregator.key", "signing.key")


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    pki = tmp_path / "pki"
    init_fleet(pki, "f1")
    return pki


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def crl_serials(pki: Path) -> set[int]:
    crl = x509.load_pem_x509_crl((pki / "ca.crl").read_bytes())
    assert crl.is_signature_valid(cert(pki / "ca.crt").public_key())  # type: ignore[arg-type]
    return {entry.serial_number for entry in crl}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def cn(certificate: x509.Certificate) -> str:
    return str(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def eku(certificate: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def openssl_verify(pki: Path, client: x509.Certificate) -> None:
    """The chain and the TLS client purpose as Mosquitto's OpenSSL checks them (cryptography's
    own verifier wants a SAN in client certificates, which Mosquitto does not use)."""
    ca = cert(pki / "ca.crt")
    client.verify_directly_issued_by(ca)
    openssl = shutil.which("openssl")
    if openssl is None:
        return
    pem = client.public_bytes(serialization.Encoding.PEM)
    args = [openssl, "verify", "-CAfile", str(pki / "ca.crt"), "-CRLfile", str(pki / "ca.crl")]
    args += ["-crl_check", "-purpose", "sslclient"]
    result = subprocess.run(args, input=pem, capture_output=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# -- init -------------------------------------------------------------------------------------


def test_init_writes_the_contract_layout_with_private_keys_0600(tmp_path: Path) -> None:
    old = os.umask(0)  # even a permissive umask must not expose a key
    try:
        init_fleet(tmp_path / "pki", "f1")
    finally:
        os.umask(old)
    pki = tmp_path / "pki"
    expected = {"ca.crt", "server.crt", "aggregator.crt", "signing.pub", "ca.crl", "passwd"}
    expected |= {"fedge.acl", "devices.json", *KEYS}
    assert expected <= {p.name for p in pki.iterdir()}
    assert {name: mode(pki / name) for name in KEYS} == dict.fromkeys(KEYS, 0o600)
    assert (pki / "passwd").read_text() == ""
    assert read_registry(pki) == {"fleet": "f1", "devices": {}}
    assert "user aggregator" in (pki / "fedge.acl").read_text()


def test_the_ca_is_a_p256_ca_for_ten_years(pki: Path) -> None:
    ca = cert(pki / "ca.crt")
    key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    years = (ca.not_valid_after_utc - ca.not_valid_before_utc).days / 365
    assert 9.9 < years < 10.1


def test_the_broker_and_aggregator_certificates_verify_against_the_ca(pki: Path) -> None:
    from cryptography.x509.verification import PolicyBuilder, Store

    ca, server = cert(pki / "ca.crt"), cert(pki / "server.crt")
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert eku(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    verifier = PolicyBuilder().store(Store([ca]))
    verifier.build_server_verifier(x509.DNSName("localhost")).verify(server, [])
    aggregator = cert(pki / "aggregator.crt")
    assert cn(aggregator) == "aggregator" and eku(aggregator) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    openssl_verify(pki, aggregator)
    # Each key belongs to its certificate (ssl refuses a mismatched pair).
    for stem in ("server", "aggregator"):
        ssl.create_default_context().load_cert_chain(pki / f"{stem}.crt", pki / f"{stem}.key")


def test_the_signing_key_pair_is_ed25519_pem(pki: Path) -> None:
    private = serialization.load_pem_private_key((pki / "signing.key").read_bytes(), None)
    public = serialization.load_pem_public_key((pki / "signing.pub").read_bytes())
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    assert isinstance(public, ed25519.Ed25519PublicKey)
    assert (pki / "signing.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    signature = private.sign(b"round 1")
    public.verify(signature, b"round 1")


def test_server_names_become_dns_and_ip_sans(tmp_path: Path) -> None:
    init_fleet(tmp_path, "f1", ["broker.example.com", "10.0.0.5", "::1"])
    sans = cert(tmp_path / "server.crt").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert sans.value.get_values_for_type(x509.DNSName) == ["broker.example.com"]
    assert [str(ip) for ip in sans.value.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "::1"]
    assert cn(cert(tmp_path / "server.crt")) == "broker.example.com"


def test_an_existing_ca_is_kept_unless_forced(pki: Path) -> None:
    provision_device(pki, "dev-a", "f1")
    before = (pki / "ca.crt").read_bytes()
    with pytest.raises(ProvisionError, match="already has a fleet CA; use --force"):
        init_fleet(pki, "f1")
    assert (pki / "ca.crt").read_bytes() == before

    init_fleet(pki, "f2", force=True)

    assert (pki / "ca.crt").read_bytes() != before
    assert read_registry(pki) == {"fleet": "f2", "devices": {}}
    assert not (pki / "devices" / "dev-a").exists()  # signed by the old CA: useless


# -- devices ----------------------------------------------------------------------------------


def test_a_device_bundle_has_its_certificate_key_ca_and_the_aggregator_key(pki: Path) -> None:
    provision_device(pki, "dev-a", "f1", max_samples=500)
    bundle = pki / "devices" / "dev-a"
    assert sorted(p.name for p in bundle.iterdir()) == [
        "agent.toml",
        "aggregator.pub",
        "ca.crt",
        "device.crt",
        "device.key",
    ]
    assert mode(bundle / "device.key") == 0o600
    assert (bundle / "ca.crt").read_bytes() == (pki / "ca.crt").read_bytes()
    assert (bundle / "aggregator.pub").read_bytes() == (pki / "signing.pub").read_bytes()
    device = cert(bundle / "device.crt")
    assert cn(device) == "dev-a" and eku(device) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    openssl_verify(pki, device)
    ssl.create_default_context().load_cert_chain(bundle / "device.crt", bundle / "device.key")
    entry = read_registry(pki)["devices"]["dev-a"]
    assert entry == {
        "fleet": "f1",
        "serial": format(device.serial_number, "x"),
        "max_samples": 500,
        "revoked": False,
        "role": "device",
    }


def test_agent_toml_follows_the_contract(pki: Path) -> None:
    provision_device(pki, "dev-a", "f1", broker_host="broker.lan")
    raw = tomllib.loads((pki / "devices" / "dev-a" / "agent.toml").read_text())
    assert raw == {
        "device_id": "dev-a",
        "fleet": "f1",
        "broker": "mqtts://broker.lan:8883",
        "model": "/opt/fedge/models/digits_mlp.tflite",
        "data": "/var/lib/fedge/partition.npz",
        "state_dir": "/var/lib/fedge",
        "aggregator_keys": ["aggregator.pub"],
        "tls": {
            "ca_file": "ca.crt",
            "cert_file": "device.crt",
            "key_file": "device.key",
            "verify_hostname": True,
        },
    }


def test_the_default_broker_host_is_the_first_server_name(tmp_path: Path) -> None:
    init_fleet(tmp_path, "f1", ["mqtt.example.org", "192.0.2.7"])
    provision_device(tmp_path, "dev-a", "f1")
    raw = tomllib.loads((tmp_path / "devices" / "dev-a" / "agent.toml").read_text())
    assert raw["broker"] == "mqtts://mqtt.example.org:8883"


def test_a_serial_device_with_a_password(pki: Path) -> None:
    provision_device(
        pki, "pump-7", "f1", password=True, serial_port="/dev/ttyACM0", task="classify"
    )
    bundle = pki / "devices" / "pump-7"
    raw = tomllib.loads((bundle / "agent.toml").read_text())
    assert raw["broker"] == "mqtts://localhost:8884"
    assert raw["model"] == "/opt/fedge/models/machine_forecaster.tflite"
    assert "data" not in raw
    assert raw["serial"] == {"port": "/dev/ttyACM0"} and raw["task"] == {"kind": "classify"}
    assert raw["tls"] == {
        "ca_file": "ca.crt",
        "username": "pump-7",
        "password_file": "password",
        "verify_hostname": True,
    }
    assert mode(bundle / "password") == 0o600
    secret = (bundle / "password").read_text()
    assert len(secret) >= 24 and secret.strip() == secret
    [line] = (pki / "passwd").read_text().splitlines()
    user, hashed = line.split(":", 1)
    assert user == "pump-7" and check_mosquitto_password(hashed, secret)
    assert mode(pki / "passwd") == 0o600


def test_the_bundle_config_loads_as_an_agent_config(pki: Path, tmp_path: Path) -> None:
    from fedge.agent.config import AgentConfig

    provision_device(pki, "dev-a", "f1")
    provision_device(pki, "dev-p", "f1", password=True)
    for device in ("dev-a", "dev-p"):
        bundle = pki / "devices" / device
        raw = tomllib.loads((bundle / "agent.toml").read_text())
        raw["model"] = str(REPO / "models" / "artifacts" / "digits_mlp.tflite")  # device paths
        raw["data"] = raw["model"]
        cfg = AgentConfig.model_validate(raw, context={"base_dir": bundle})
        assert cfg.device_id == device and cfg.broker.startswith("mqtts://")


def test_a_gateway_writes_every_devices_update_and_gets_no_agent_config(pki: Path) -> None:
    provision_device(pki, "gw-1", "f1", gateway=True)
    assert sorted(p.name for p in (pki / "devices" / "gw-1").iterdir()) == [
        "ca.crt",
        "device.crt",
        "device.key",
    ]
    acl = (pki / "fedge.acl").read_text()
    assert "user gw-1\ntopic write fedge/v1/f1/update/+\ntopic write fedge/v1/f1/status/+\n" in acl


def test_a_site_gateway_gets_its_brokers_files_and_its_workers_bundle(pki: Path) -> None:
    provision_device(pki, "site-a", "f1", site_gateway=True, server_names=["gw-a.local"])
    assert sorted(p.name for p in (pki / "devices" / "site-a").iterdir()) == [
        "aggregator.pub",
        "aggregator.toml",
        "ca.crt",
        "worker.crt",
        "worker.key",
    ]
    site = pki / "sites" / "site-a"
    assert sorted(p.name for p in site.iterdir()) == [
        "bridge.conf",
        "bridge.crt",
        "bridge.key",
        "ca.crl",
        "ca.crt",
        "fedge.acl",
        "passwd",
        "server.crt",
        "server.key",
    ]
    assert mode(site / "bridge.key") == mode(site / "server.key") == 0o600
    assert mode(pki / "devices" / "site-a" / "worker.key") == 0o600
    # Three certificates: the bridge's (CN site-a, for the central broker), the worker's
    # (CN site-a.worker, for the site broker) and the site broker's own.
    assert cn(cert(site / "bridge.crt")) == "site-a"
    assert cn(cert(pki / "devices" / "site-a" / "worker.crt")) == "site-a.worker"
    server = cert(site / "server.crt")
    assert eku(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["gw-a.local"]
    for client in (site / "bridge.crt", pki / "devices" / "site-a" / "worker.crt"):
        openssl_verify(pki, cert(client))
    entry = read_registry(pki)["devices"]["site-a"]
    assert entry["role"] == "site-gateway" and {"worker_serial", "server_serial"} <= set(entry)
    # Central: the bridge's block, nothing for the worker; the site: the worker's, no bridge.
    central = (pki / "fedge.acl").read_text()
    assert "user site-a\n" in central and "site-a.worker" not in central
    block = central.split("user site-a\n")[1]
    assert "topic write fedge/v1/f1/shard/site-a/partial\n" in block
    assert "update" not in block and "status" not in block  # no device at the site yet
    local = (site / "fedge.acl").read_text()
    assert "user site-a.worker\n" in local and "user site-a\n" not in local
    assert (site / "ca.crl").read_bytes() == (pki / "ca.crl").read_bytes()
    bridge = (site / "bridge.conf").read_text()
    assert "address localhost:8883\n" in bridge  # the central broker's first name
    assert "bridge_certfile /etc/mosquitto/certs/bridge.crt\n" in bridge
    with pytest.raises(ProvisionError, match=r"^an identity is one of a gateway, a site gateway"):
        provision_device(pki, "site-b", "f1", site_gateway=True, gateway=True)
    with pytest.raises(ProvisionError, match=r"^a site gateway's bridge and worker use cert"):
        provision_device(pki, "site-b", "f1", site_gateway=True, password=True)
    with pytest.raises(ProvisionError, match=r"^server names are for --init .* or --site-gate"):
        provision_device(pki, "dev-x", "f1", server_names=["x.local"])


def test_site_devices_are_in_their_sites_acl_and_passwd_and_not_the_central_ones(
    pki: Path,
) -> None:
    provision_device(pki, "site-a", "f1", site_gateway=True, server_names=["gw-a.local"])
    provision_device(pki, "site-b", "f1", site_gateway=True, server_names=["gw-b.local"])
    provision_device(pki, "dev-a1", "f1", site="site-a")
    provision_device(pki, "dev-a2", "f1", site="site-a", password=True)
    provision_device(pki, "dev-b1", "f1", site="site-b")
    provision_device(pki, "dev-c", "f1")  # on the central broker
    site_a, site_b = pki / "sites" / "site-a", pki / "sites" / "site-b"
    assert read_registry(pki)["devices"]["dev-a1"]["site"] == "site-a"
    agent = tomllib.loads((pki / "devices" / "dev-a1" / "agent.toml").read_text())
    assert agent["broker"] == "mqtts://gw-a.local:8883"  # its site broker's first name
    assert site_acl_text("f1", "site-a", ["dev-a1", "dev-a2"]) == (site_a / "fedge.acl").read_text()
    local = (site_a / "fedge.acl").read_text()
    assert "user dev-a1\n" in local and "user dev-b1" not in local and "user dev-c" not in local
    assert "user dev-b1\n" in (site_b / "fedge.acl").read_text()
    central = (pki / "fedge.acl").read_text()
    assert "user dev-c\n" in central
    assert "user dev-a1" not in central and "user dev-b1" not in central
    # The bridge of site-a may write the statuses of site-a's devices only.
    block = central.split("user site-a\n")[1].split("\n\n")[0]
    assert re.findall(r"status/\S+", block) == ["status/dev-a1", "status/dev-a2"]
    assert [ln.split(":")[0] for ln in (site_a / "passwd").read_text().splitlines()] == ["dev-a2"]
    assert (pki / "passwd").read_text() == ""
    secret = (pki / "devices" / "dev-a2" / "password").read_text()
    assert check_mosquitto_password(
        (site_a / "passwd").read_text().split(":", 1)[1].strip(), secret
    )

    # Moved to the central broker: out of the site's ACL and passwd, into the central ones.
    provision_device(pki, "dev-a2", "f1", password=True, force=True)
    assert "dev-a2" not in (site_a / "fedge.acl").read_text() + (site_a / "passwd").read_text()
    assert "user dev-a2\n" in (pki / "fedge.acl").read_text()
    assert (pki / "passwd").read_text().startswith("dev-a2:")
    # Revoking a device re-signs the CRL, and every site broker gets the new one.
    revoke_device(pki, "dev-a1")
    assert "dev-a1" not in (site_a / "fedge.acl").read_text()
    for site in (site_a, site_b):
        assert (site / "ca.crl").read_bytes() == (pki / "ca.crl").read_bytes()
    # Revoking a site puts its three certificates on the CRL and removes its folders.
    entry = read_registry(pki)["devices"]["site-b"]
    revoke_device(pki, "site-b")
    serials = {int(entry[k], 16) for k in ("serial", "worker_serial", "server_serial")}
    assert serials <= crl_serials(pki)
    assert not site_b.exists() and not (pki / "devices" / "site-b").exists()
    assert "user site-b" not in (pki / "fedge.acl").read_text()
    assert "user dev-b1" not in (pki / "fedge.acl").read_text()  # nor its devices, anywhere


def test_a_site_device_needs_its_site_and_workers_names_are_reserved(pki: Path) -> None:
    with pytest.raises(ProvisionError, match=r"^no site gateway 'site-a' in .*--site-gateway"):
        provision_device(pki, "dev-a1", "f1", site="site-a")
    provision_device(pki, "site-a", "f1", site_gateway=True)
    with pytest.raises(ProvisionError, match=r"^--site places a device behind"):
        provision_device(pki, "gw-1", "f1", site="site-a", gateway=True)
    with pytest.raises(ProvisionError, match=r"reserved"):
        provision_device(pki, "site-a.worker", "f1")


def test_bridge_conf_is_broker_config_site_gateway_conf() -> None:
    text = bridge_conf_text("site-a", "fedge-broker.example.com")
    assert text == (REPO / "broker_config" / "site-gateway.conf").read_text()


def test_the_worker_bundle_config_loads_as_a_shard_worker_config(pki: Path) -> None:
    provision_device(pki, "site-a", "f1", site_gateway=True)
    bundle = pki / "devices" / "site-a"
    raw = tomllib.loads((bundle / "aggregator.toml").read_text())
    assert raw["model"] == "/opt/fedge/models/digits_mlp.tflite"
    raw["model"] = str(REPO / "models" / "artifacts" / "digits_mlp.tflite")
    cfg = AggregatorConfig.model_validate(raw, context={"base_dir": bundle})
    assert cfg.broker == "mqtts://localhost:8883" and cfg.signing_key is None
    assert cfg.aggregator_keys == (bundle / "aggregator.pub",)
    assert cfg.shards is not None and cfg.shards.workers == ["site-a"]
    assert cfg.tls is not None and cfg.tls.cert_file == bundle / "worker.crt"


def test_an_existing_device_is_kept_unless_forced(pki: Path) -> None:
    provision_device(pki, "dev-a", "f1", password=True)
    old = cert(pki / "devices" / "dev-a" / "device.crt")
    with pytest.raises(ProvisionError, match=r"^device dev-a is already provisioned in .*--force"):
        provision_device(pki, "dev-a", "f1")
    assert cert(pki / "devices" / "dev-a" / "device.crt") == old

    provision_device(pki, "dev-a", "f1", force=True)

    new = cert(pki / "devices" / "dev-a" / "device.crt")
    assert new.serial_number != old.serial_number
    assert crl_serials(pki) == {old.serial_number}  # the replaced certificate stops working
    assert not (pki / "devices" / "dev-a" / "password").exists()
    assert (pki / "passwd").read_text() == ""


@pytest.mark.parametrize(
    "device_id", ["aggregator", "Aggregator", ".", "..", "a/b", "", "x" * 65, "dev+1", "#", "a b"]
)
def test_reserved_and_invalid_device_ids_are_refused(pki: Path, device_id: str) -> None:
    with pytest.raises(ProvisionError) as info:
        provision_device(pki, device_id, "f1")
    assert "\n" not in str(info.value)
    assert not (pki / "devices").exists()


def test_a_device_of_another_fleet_is_refused(pki: Path) -> None:
    with pytest.raises(ProvisionError, match="PKI of fleet 'f1', not 'f2'"):
        provision_device(pki, "dev-a", "f2")


def test_a_device_needs_an_initialised_folder(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="fedge provision --init"):
        provision_device(tmp_path / "nothing", "dev-a", "f1")


# -- revocation -------------------------------------------------------------------------------


def test_revoke_updates_crl_acl_passwd_registry_and_removes_the_bundle(pki: Path) -> None:
    provision_device(pki, "dev-a", "f1", password=True)
    provision_device(pki, "dev-b", "f1", password=True)
    serial = cert(pki / "devices" / "dev-a" / "device.crt").serial_number
    assert crl_serials(pki) == set()

    revoke_device(pki, "dev-a")

    assert crl_serials(pki) == {serial}
    acl = (pki / "fedge.acl").read_text()
    assert "dev-a" not in acl and "user dev-b" in acl
    assert [ln.split(":")[0] for ln in (pki / "passwd").read_text().splitlines()] == ["dev-b"]
    assert read_registry(pki)["devices"]["dev-a"]["revoked"] is True
    assert not (pki / "devices" / "dev-a").exists()
    assert (pki / "devices" / "dev-b").is_dir()
    crl = x509.load_pem_x509_crl((pki / "ca.crl").read_bytes())
    assert crl.next_update_utc == cert(pki / "ca.crt").not_valid_after_utc  # never lapses early

    assert revoke_device(pki, "dev-a") == []  # again: nothing to do
    with pytest.raises(ProvisionError, match=r"^no device dev-z in "):
        revoke_device(pki, "dev-z")


def test_a_revoked_device_can_be_provisioned_again_with_force(pki: Path) -> None:
    provision_device(pki, "dev-a", "f1")
    revoke_device(pki, "dev-a")
    with pytest.raises(ProvisionError, match=r"^device dev-a was revoked in .*--force"):
        provision_device(pki, "dev-a", "f1")

    provision_device(pki, "dev-a", "f1", force=True)

    assert read_registry(pki)["devices"]["dev-a"]["revoked"] is False
    assert "user dev-a" in (pki / "fedge.acl").read_text()
    assert len(crl_serials(pki)) == 1  # the old certificate stays revoked


# -- Mosquitto texts --------------------------------------------------------------------------


def test_the_acl_grants_each_identity_exactly_its_topics() -> None:
    identities = {"dev-a": "device", "gw-1": "gateway", "site-a": "site-gateway"}
    assert acl_text("f1", identities, {"site-a": ["dev-s2", "dev-s1"]}).split("\n\n")[1:] == [
        "user aggregator\n"
        "topic read fedge/v1/f1/update/+\n"
        "topic read fedge/v1/f1/status/+\n"
        "topic readwrite fedge/v1/f1/round\n"
        "topic readwrite fedge/v1/f1/global\n"
        "topic readwrite fedge/v1/f1/global/delta\n"
        "topic read fedge/v1/f1/shard/+/accepted\n"
        "topic read fedge/v1/f1/shard/+/partial\n"
        "topic write fedge/v1/f1/shard/+/close\n"
        "topic write fedge/v1/f1/secagg/+\n"
        "topic write fedge/v1/f1/secagg\n"
        "topic write fedge/v1/f1/inbox/+",
        "# device\n"
        "user dev-a\n"
        "topic write fedge/v1/f1/update/dev-a\n"
        "topic write fedge/v1/f1/status/dev-a\n"
        "topic read fedge/v1/f1/round\n"
        "topic read fedge/v1/f1/global\n"
        "topic read fedge/v1/f1/global/delta\n"
        "topic read fedge/v1/f1/inbox/dev-a\n"
        "topic read fedge/v1/f1/secagg/dev-a\n"
        "topic read fedge/v1/f1/secagg",
        "# gateway\n"
        "user gw-1\n"
        "topic write fedge/v1/f1/update/+\n"
        "topic write fedge/v1/f1/status/+\n"
        "topic read fedge/v1/f1/round\n"
        "topic read fedge/v1/f1/global\n"
        "topic read fedge/v1/f1/global/delta\n"
        "topic read fedge/v1/f1/inbox/+\n"
        "topic read fedge/v1/f1/secagg/+\n"
        "topic read fedge/v1/f1/secagg",
        "# site-gateway (its bridge)\n"
        "user site-a\n"
        "topic write fedge/v1/f1/status/dev-s1\n"
        "topic write fedge/v1/f1/status/dev-s2\n"
        "topic read fedge/v1/f1/inbox/dev-s1\n"
        "topic read fedge/v1/f1/inbox/dev-s2\n"
        "topic write fedge/v1/f1/shard/site-a/accepted\n"
        "topic write fedge/v1/f1/shard/site-a/partial\n"
        "topic read fedge/v1/f1/round\n"
        "topic read fedge/v1/f1/global\n"
        "topic read fedge/v1/f1/global/delta\n"
        "topic read fedge/v1/f1/shard/site-a/close\n",
    ]
    lines = acl_text("f1", {"dev-a": "device"}).splitlines()
    assert not [ln for ln in lines if ln.startswith("pattern")]


def test_the_site_acl_grants_the_worker_and_each_device_exactly_their_topics() -> None:
    assert site_acl_text("f1", "site-a", ["dev-s1"]).split("\n\n")[1:] == [
        "# worker\n"
        "user site-a.worker\n"
        "topic read fedge/v1/f1/update/+\n"
        "topic read fedge/v1/f1/round\n"
        "topic read fedge/v1/f1/shard/site-a/close\n"
        "topic write fedge/v1/f1/shard/site-a/accepted\n"
        "topic write fedge/v1/f1/shard/site-a/partial",
        "# device\n"
        "user dev-s1\n"
        "topic write fedge/v1/f1/update/dev-s1\n"
        "topic write fedge/v1/f1/status/dev-s1\n"
        "topic read fedge/v1/f1/round\n"
        "topic read fedge/v1/f1/global\n"
        "topic read fedge/v1/f1/global/delta\n"
        "topic read fedge/v1/f1/inbox/dev-s1\n",
    ]


def mosquitto_passwd() -> str:
    found = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not os.access(found, os.X_OK):
        pytest.skip("mosquitto_passwd is not installed")
    return found


def test_password_hashes_are_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    subprocess.run([mosquitto_passwd(), "-b", str(passwd), "dev-a", "s3cret pw"], check=True)
    user, theirs = passwd.read_text().strip().split(":", 1)
    assert user == "dev-a"
    assert re.fullmatch(r"\$7\$101\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==", theirs)
    salt = base64.b64decode(theirs.split("$")[3])

    assert mosquitto_password_hash("s3cret pw", salt=salt) == theirs
    assert check_mosquitto_password(theirs, "s3cret pw")
    assert not check_mosquitto_password(theirs, "s3cret")
    ours = mosquitto_password_hash("s3cret pw")
    assert re.fullmatch(r"\$7\$101\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==", ours)
    assert check_mosquitto_password(ours, "s3cret pw") and ours != theirs  # fresh salt
    assert not check_mosquitto_password("$6$not$ours", "s3cret pw")


# -- the command line -------------------------------------------------------------------------


def test_cli_init_provision_revoke(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["provision", "--init", "--fleet", "home", "--server-name", "broker.lan"]) == 0
    out = capsys.readouterr().out
    assert "wrote   fleet-pki/ca.key" in out and "broker.lan" in out
    assert main(["provision", "pi-1", "--password", "--max-samples", "900"]) == 0
    assert "fleet-pki/devices/pi-1/password" in capsys.readouterr().out
    assert read_registry("fleet-pki")["devices"]["pi-1"]["max_samples"] == 900
    assert main(["provision", "pi-1", "--fleet", "home", "--force", "--model", "x"]) == 0
    raw = tomllib.loads(Path("fleet-pki/devices/pi-1/agent.toml").read_text())
    assert raw["model"] == "/opt/fedge/models/x.tflite" and raw["broker"].endswith(
        "broker.lan:8883"
    )
    capsys.readouterr()
    assert main(["provision", "pi-1", "--revoke"]) == 0
    assert "removed fleet-pki/devices/pi-1" in capsys.readouterr().out
    assert main(["provision", "pi-1", "--revoke"]) == 0
    assert "already revoked" in capsys.readouterr().out


def test_cli_site_gateway_and_a_device_behind_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["provision", "--init", "--fleet", "home", "--server-name", "broker.lan"]) == 0
    capsys.readouterr()
    site = ["provision", "site-a", "--site-gateway", "--server-name", "gw-a.lan"]
    assert main(site) == 0
    out, err = capsys.readouterr()
    assert "wrote   fleet-pki/sites/site-a/bridge.conf" in out and err == ""
    assert "address broker.lan:8883\n" in Path("fleet-pki/sites/site-a/bridge.conf").read_text()
    worker = tomllib.loads(Path("fleet-pki/devices/site-a/aggregator.toml").read_text())
    assert worker["broker"] == "mqtts://gw-a.lan:8883"
    assert main(["provision", "pi-1", "--site", "site-a"]) == 0
    assert "site site-a's broker" in capsys.readouterr().out
    raw = tomllib.loads(Path("fleet-pki/devices/pi-1/agent.toml").read_text())
    assert raw["broker"] == "mqtts://gw-a.lan:8883"
    # Again with --force: new certificates, the old ones revoked; the site keeps its devices.
    old = read_registry("fleet-pki")["devices"]["site-a"]
    assert main([*site, "--force"]) == 0
    serials = {int(old[k], 16) for k in ("serial", "worker_serial", "server_serial")}
    assert serials <= crl_serials(Path("fleet-pki"))
    assert "user pi-1\n" in Path("fleet-pki/sites/site-a/fedge.acl").read_text()
    assert main(["provision", "site-b", "--site-gateway"]) == 0
    assert "--site-gateway --server-name SITE_BROKER_HOST" in capsys.readouterr().err
    assert main(["provision", "pi-2", "--site", "site-z"]) == 2
    assert "no site gateway 'site-z'" in capsys.readouterr().err


def test_cli_init_without_server_name_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker certificate for localhost only: every bundle would name mqtts://localhost."""
    monkeypatch.chdir(tmp_path)
    assert main(["provision", "--init", "--fleet", "home"]) == 0
    assert capsys.readouterr().err == (
        "fedge: warning: the broker certificate names only localhost and 127.0.0.1; devices"
        " on other machines need --init --server-name BROKER_HOST\n"
    )
    argv = ["provision", "--init", "--fleet", "home", "--server-name", "broker.lan", "--force"]
    assert main(argv) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--init"], "use: fedge provision --init --fleet FLEET"),
        (["--init", "--fleet", "home"], "already has a fleet CA; use --force"),
        (["pi-1"], "device pi-1 is already provisioned"),
        (["aggregator"], "device id 'aggregator' is reserved"),
        (["bad/id"], "invalid device id 'bad/id'"),
        (["pi-2", "--fleet", "other"], "PKI of fleet 'home', not 'other'"),
        (["ghost", "--revoke"], "no device ghost in"),
        ([], "give a DEVICE_ID"),
        (["pi-2", "--dir", "missing"], "missing/devices.json is missing"),
        (["pi-2", "--model", "../x"], "must be a file name"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(
    argv: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    init_fleet("fleet-pki", "home")
    provision_device("fleet-pki", "pi-1", "home")
    capsys.readouterr()

    assert main(["provision", *argv]) == 2

    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedge: error: ") and message in err


def test_certificates_outlive_no_ca(pki: Path) -> None:
    provision_device(pki, "dev-a", "f1", days=100_000)
    device = cert(pki / "devices" / "dev-a" / "device.crt")
    assert device.not_valid_after_utc == cert(pki / "ca.crt").not_valid_after_utc
    with pytest.raises(ProvisionError, match="at least 1 day"):
        provision_device(pki, "dev-b", "f1", days=0)
    assert dt.timedelta(days=1) > abs(
        device.not_valid_before_utc - dt.datetime.now(dt.timezone.utc)
    )

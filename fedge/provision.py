"""Fleet provisioning: a fleet CA, the broker's and the aggregator's certificates, Mosquitto's
ACL and password file, and one bundle per device. Made with ``cryptography`` alone (no openssl).

A provisioning directory (PKI) holds::

    ca.crt ca.key             fleet CA (ECDSA P-256, CA:TRUE, 10 years); ca.key stays here
    server.crt server.key     the broker's certificate (SANs: the server names; serverAuth)
    aggregator.crt .key       the aggregator's TLS client certificate (CN "aggregator")
    signing.key signing.pub   the aggregator's Ed25519 key pair (PKCS8 / SubjectPublicKeyInfo)
    ca.crl                    revoked certificates; the broker needs it even when empty
    passwd                    Mosquitto password file ($7$: PBKDF2-SHA512), may be empty
    fedge.acl                 Mosquitto ACL: one block per identity, this fleet's topics only
    devices.json              {"fleet": F, "devices": {id: {fleet, serial, max_samples,
                              revoked, role, site}}}; serial is the certificate's, in hex
    devices/<id>/             the bundle for one device: agent.toml, device.crt, device.key,
                              ca.crt, aggregator.pub, and password when asked for, and
                              he.secret when the fleet has HE keys
    he.secret he.public       optional (``init_he_keys``, ``fedge provision --he``, needs
                              fedge[he]): the fleet's CKKS key files (fedge.protocol.he).
                              he.secret (0600) goes into every device bundle made after it
                              and NEVER to the aggregator, which gets he.public: it can add
                              encrypted updates but not decrypt them
    sites/<site>/             a site gateway's broker (--site-gateway): as the central broker's
                              files above (ca.crt, ca.crl, server.crt/.key, passwd, fedge.acl
                              for the site's devices and its worker) plus bridge.crt/.key and
                              bridge.conf, the bridge to the central broker
    devices/<site>/           the site gateway's worker: aggregator.toml, worker.crt/.key,
                              ca.crt, aggregator.pub

The fleet has one CA, so every certificate it signed is valid on every broker of the fleet;
what an identity may do on a broker is that broker's ACL alone. A site's devices are in its
broker's ACL and not in the central one; its worker (CN ``<site>.worker``) only in the site's,
and its bridge (CN ``<site>``) only in the central one.

Certificates, texts and hashes are built by pure functions; ``_write`` is the one place that
writes a file (created with its final mode, fsync, ``os.replace``, fsync of the folder). Every
change to a PKI holds an exclusive lock on ``PKI/.lock``. Private keys are mode 0600.

Errors::

    ProvisionError (ValueError)   every user error; str() is one line
"""

from __future__ import annotations

import base64
import datetime as dt
import fcntl
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TOPIC_PREFIX = "fedge/v1"
TLS_PORT = 8883  # production.conf: client certificates
PASSWORD_PORT = 8884  # production.conf: username and password over TLS
CA_DAYS = 3650
LEAF_DAYS = 825
BACKDATE = dt.timedelta(hours=1)  # a device clock a little behind still accepts new certificates
AGGREGATOR = "aggregator"
# Names a device may not take: the aggregator's identity, and path components.
RESERVED_IDS = frozenset({AGGREGATOR, ".", ".."})
_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}")
_FILE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
# The broker certificate's names when none are given: good for one machine only.
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1")
DEVICE_DATA = "/var/lib/fedge/partition.npz"
MODELS_DIR = "/opt/fedge/models"
STATE_DIR = "/var/lib/fedge"
DATA_MODEL = "digits_mlp.tflite"
SERIAL_MODEL = "machine_forecaster.tflite"
TASK_KINDS = ("forecast", "autoencode", "classify")
HE_SECRET = "he.secret"
HE_PUBLIC = "he.public"
ROLES = ("device", "gateway", "site-gateway", "operator")
# A site gateway's worker is the identity "<site>.worker" on its site's broker.
WORKER_SUFFIX = ".worker"
SITES = "sites"  # PKI/sites/<site>/: the site brokers' files
# Where a broker's files are installed (broker_config/production.conf; the bridge's too).
BROKER_CERTS = "/etc/mosquitto/certs"
AGGREGATOR_STATE = "/var/lib/fedge-aggregator"

# mosquitto_passwd (2.0): PBKDF2-HMAC-SHA512, 12-byte salt, 101 iterations, base64 fields.
PASSWD_ITERATIONS = 101
PASSWD_SALT_BYTES = 12


class ProvisionError(ValueError):
    """A provisioning request that cannot be done as asked; ``str()`` is one line."""


@dataclass(frozen=True)
class Change:
    """One file written or removed, for the command line to print."""

    action: str  # "wrote" or "removed"
    path: Path

    def __str__(self) -> str:
        return f"{self.action:8s}{self.path}"


# -- names ------------------------------------------------------------------------------------


def check_id(kind: str, value: str) -> str:
    """``value`` if it is one MQTT topic level by fedge's id rule, else ProvisionError."""
    if not isinstance(value, str) or _ID.fullmatch(value) is None:
        raise ProvisionError(f"invalid {kind} {value!r}: want 1-64 characters of [A-Za-z0-9_.-]")
    return value


def check_device_id(device_id: str) -> str:
    check_id("device id", device_id)
    if device_id.lower() in RESERVED_IDS or device_id.endswith(WORKER_SUFFIX):
        raise ProvisionError(
            f"device id {device_id!r} is reserved (aggregator, and *{WORKER_SUFFIX}: site"
            " gateways' workers); choose another name"
        )
    return device_id


def worker_id(site: str) -> str:
    """The identity (certificate CN) of site gateway ``site``'s worker on the site broker."""
    return f"{site}{WORKER_SUFFIX}"


def _check_host(host: str) -> str:
    if _is_ip(host):
        if ":" in host:
            raise ProvisionError(
                f"broker host {host!r}: IPv6 literals do not fit the broker URL; use a DNS name"
            )
        return host
    if _HOST.fullmatch(host) is None:
        raise ProvisionError(f"invalid host name {host!r}")
    return host


def _check_days(days: int) -> None:
    if days < 1:
        raise ProvisionError(f"certificate validity must be at least 1 day, got {days}")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


# -- keys and certificates (pure) -------------------------------------------------------------


def _now(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.timezone.utc)


def _expiry(cert: x509.Certificate) -> dt.datetime:
    """``not_valid_after`` as an aware datetime (cryptography 41 has only the naive one)."""
    aware = getattr(cert, "not_valid_after_utc", None)
    return aware if aware is not None else cert.not_valid_after.replace(tzinfo=dt.timezone.utc)


def new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedge"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def make_ca(
    key: ec.EllipticCurvePrivateKey, fleet: str, *, now: dt.datetime | None = None
) -> x509.Certificate:
    """A self-signed fleet CA: CA:TRUE (no intermediates), key cert sign and CRL sign."""
    start = _now(now)
    name = _name(f"fedge fleet CA {fleet}")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - BACKDATE)
        .not_valid_after(start + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )


def issue_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    cn: str,
    *,
    server_names: Sequence[str] = (),
    days: int = LEAF_DAYS,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """A leaf certificate signed by the fleet CA: serverAuth with SANs when ``server_names`` is
    given, else clientAuth (a client's identity is its CN)."""
    _check_days(days)
    start = _now(now)
    server = bool(server_names)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - BACKDATE)
        .not_valid_after(min(start + dt.timedelta(days=days), _expiry(ca_cert)))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        sans: list[x509.GeneralName] = [
            x509.IPAddress(ipaddress.ip_address(n)) if _is_ip(n) else x509.DNSName(n)
            for n in server_names
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def make_crl(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    revoked: Iterable[x509.RevokedCertificate] = (),
    *,
    now: dt.datetime | None = None,
) -> x509.CertificateRevocationList:
    """The CA's CRL listing ``revoked``. Its next update is the CA's expiry: OpenSSL rejects
    every client once a CRL has expired, and nothing here re-signs it on a schedule."""
    start = _now(now)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(start - BACKDATE)
        .next_update(_expiry(ca_cert))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(ca_key, hashes.SHA256())


def revoked_entry(
    serial: int, reason: x509.ReasonFlags, *, now: dt.datetime | None = None
) -> x509.RevokedCertificate:
    return (
        x509.RevokedCertificateBuilder()
        .serial_number(serial)
        .revocation_date(_now(now))
        .add_extension(x509.CRLReason(reason), critical=False)
        .build()
    )


def key_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# -- Mosquitto texts (pure) -------------------------------------------------------------------


def mosquitto_password_hash(
    password: str, *, salt: bytes | None = None, iterations: int = PASSWD_ITERATIONS
) -> str:
    """``$7$ITER$SALT$HASH`` as mosquitto_passwd 2.x writes it (PBKDF2-HMAC-SHA512)."""
    salt = salt if salt is not None else secrets.token_bytes(PASSWD_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


def check_mosquitto_password(hashed: str, password: str) -> bool:
    """True if ``password`` matches a ``$7$`` hash (mosquitto_passwd's or ours)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[:2] != ["", "7"] or not parts[2].isdigit():
        return False
    try:
        salt, expected = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    except ValueError:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]))
    return hmac.compare_digest(digest, expected)


def acl_text(
    fleet: str, identities: Mapping[str, str], sites: Mapping[str, Sequence[str]] | None = None
) -> str:
    """The central broker's Mosquitto ACL for ``fleet``: the aggregator's block and one per
    identity (id -> role). ``sites`` maps a site gateway to its devices (not in
    ``identities``: they connect to their site's broker, ``site_acl_text``); its bridge may
    write those devices' statuses and its own shard topics.

    No ``pattern`` lines: a pattern applies to every authenticated user, so a revoked device
    whose certificate still verifies (before the broker reloads its CRL) would keep its topics.
    """
    sites = sites or {}
    base = f"{TOPIC_PREFIX}/{check_id('fleet', fleet)}"
    lines = [
        f"# Mosquitto ACL for fleet {fleet}, generated by `fedge provision`: every provision or",
        "# revoke rewrites it. A username is a client certificate's CN (port 8883) or a password",
        "# file user (port 8884). Anything not granted below is denied, and there are no pattern",
        "# lines, so a revoked device gets nothing even while its certificate still verifies.",
        "",
        f"user {AGGREGATOR}",
        f"topic read {base}/update/+",
        f"topic read {base}/status/+",
        f"topic readwrite {base}/round",
        f"topic readwrite {base}/global",
        f"topic readwrite {base}/global/delta",  # [downlink]: compact globals
        f"topic read {base}/shard/+/accepted",  # [shards]: workers' reports and partial sums
        f"topic read {base}/shard/+/partial",
        f"topic write {base}/shard/+/close",
        f"topic write {base}/secagg/+",  # [secure]: key lists, shares, the survivors
        f"topic write {base}/secagg",
        f"topic write {base}/inbox/+",  # quiet devices: their rounds and models
    ]
    for ident, role in sorted(identities.items()):
        check_id("identity", ident)
        if role == "operator":  # `fedge status` from a workstation: reads, never writes
            lines += [
                "",
                "# operator",
                f"user {ident}",
                f"topic read {base}/status/+",
                f"topic read {base}/round",
            ]
            continue
        if role == "site-gateway":  # the bridge of a site's broker: its devices' updates stay
            shard = f"{base}/shard/{ident}"
            lines += ["", "# site-gateway (its bridge)", f"user {ident}"]
            lines += [f"topic write {base}/status/{d}" for d in sorted(sites.get(ident, ()))]
            lines += [f"topic read {base}/inbox/{d}" for d in sorted(sites.get(ident, ()))]
            lines += [
                f"topic write {shard}/accepted",
                f"topic write {shard}/partial",
                f"topic read {base}/round",
                f"topic read {base}/global",
                f"topic read {base}/global/delta",
                f"topic read {shard}/close",
            ]
            continue
        mine = "+" if role == "gateway" else ident
        lines += ["", f"# {role}", f"user {ident}", *_device_grants(base, mine)]
    return "\n".join(lines) + "\n"


def _device_grants(base: str, device: str, *, secagg: bool = True) -> list[str]:
    """A device's topics; ``secagg``: also the aggregator's secure-aggregation messages
    (not on a site's broker: [secure] does not combine with the gateways' [shards])."""
    grants = [
        f"topic write {base}/update/{device}",
        f"topic write {base}/status/{device}",
        f"topic read {base}/round",
        f"topic read {base}/global",
        f"topic read {base}/global/delta",
        f"topic read {base}/inbox/{device}",  # a quiet device's rounds and models
    ]
    if secagg:
        grants += [f"topic read {base}/secagg/{device}", f"topic read {base}/secagg"]
    return grants


def site_acl_text(fleet: str, site: str, devices: Iterable[str]) -> str:
    """The ACL of site gateway ``site``'s own broker: its worker takes the site's updates
    (through its shared subscription; Mosquitto checks each message's topic on delivery) and
    answers the coordinator, and each of ``devices`` has a device's topics. The bridge to the
    central broker is inside the broker and needs no block."""
    base = f"{TOPIC_PREFIX}/{check_id('fleet', fleet)}"
    shard = f"{base}/shard/{check_id('site', site)}"
    lines = [
        f"# Mosquitto ACL for site {site} of fleet {fleet} (the site gateway's broker), generated",
        "# by `fedge provision`: every provision or revoke rewrites it. Its devices and its worker",
        "# only; the central broker's identities (aggregator, bridges, other sites' devices) have",
        "# certificates of the same CA, and nothing here.",
        "",
        "# worker",
        f"user {worker_id(site)}",
        f"topic read {base}/update/+",
        f"topic read {base}/round",
        f"topic read {shard}/close",
        f"topic write {shard}/accepted",
        f"topic write {shard}/partial",
    ]
    for device in sorted(devices):
        lines += ["", "# device", f"user {check_id('identity', device)}"]
        lines += _device_grants(base, device, secagg=False)
    return "\n".join(lines) + "\n"


def bridge_conf_text(site: str, central_host: str, port: int = TLS_PORT) -> str:
    """The bridge section of site gateway ``site``'s broker (append it to production.conf
    there): TLS to the central broker at ``central_host:port`` with the bridge's certificate,
    the site's statuses and shard reports and partial sums out, rounds, global models and
    close requests in. ``broker_config/site-gateway.conf`` is this for site-a."""
    check_id("site", site)
    return f"""\
# Bridge from site gateway {site}'s Mosquitto to the central fedge broker, over TLS. Written by
# `fedge provision {site} --site-gateway` as PKI/sites/{site}/bridge.conf (docs/scale.md, "Site
# gateways"). Append it to the site broker's mosquitto.conf: production.conf with the site's
# fedge.acl, passwd and server certificate, and the fleet's CA and CRL.
#
# The site's devices and its worker (`fedge aggregator --worker {site}`, certificate CN
# {worker_id(site)}) connect to this broker. Updates stay here: the worker takes every one and
# sends upstream one report per answer and one pre-weighted partial sum per round. The central
# aggregator is the shard coordinator, the sites its workers: [shards] workers = ["{site}", ...].
#
# Central side: the bridge is the identity {site} (bridge.crt, CN {site}); the central fedge.acl
# lets it write its devices' status and shard/{site}/accepted and .../partial, and read round,
# global and shard/{site}/close. Nothing else it might carry is accepted there.

connection {site}
address {central_host}:{port}
# Client id on the central broker (which replaces it by the certificate's CN anyway).
remote_clientid {site}
local_clientid bridge.{site}
bridge_protocol_version mqttv311
# The central broker then knows a bridge: retained messages keep their flag on the way in.
try_private true

# TLS 1.2+ to the central broker: its certificate (and host name) checked against the fleet
# CA, and the bridge's own certificate. Readable by the mosquitto user (root:mosquitto 0640).
bridge_cafile {BROKER_CERTS}/ca.crt
bridge_certfile {BROKER_CERTS}/bridge.crt
bridge_keyfile {BROKER_CERTS}/bridge.key
bridge_tls_version tlsv1.2
bridge_insecure false

# Durable both ends: while the uplink is down the gateway queues reports and partial sums,
# and the central broker queues rounds and close requests for the bridge.
cleansession false
local_cleansession false
start_type automatic
# Reconnect with jittered backoff between 5 s and 2 min; ping after 60 s of silence.
restart_timeout 5 120
keepalive_interval 60
# Same packet cap as the brokers (16 MiB payload + 64 KiB): a partial sum is twice the model.
bridge_max_packet_size 16842752
# Retained messages (global model, round, status) keep their retain flag across the bridge.
bridge_outgoing_retain true
# Bridge up/down is published on the gateway only ($SYS/broker/connection/{site}/state);
# the central ACL grants the bridge no $SYS topics.
notifications true
notifications_local_only true

# Topics, QoS 1, no remapping. One direction per topic, so no message can loop.
#   out: devices' heartbeats (the coordinator selects from the online devices), and the
#   worker's reports and partial sums. No update/+: updates end at the gateway.
topic fedge/v1/+/status/+ out 1
topic fedge/v1/+/shard/{site}/accepted out 1
topic fedge/v1/+/shard/{site}/partial out 1
#   in: rounds and global models for the devices and the worker (retained on both brokers),
#   and the coordinator's close requests for this site's worker.
topic fedge/v1/+/round in 1
topic fedge/v1/+/global in 1
topic fedge/v1/+/global/delta in 1
topic fedge/v1/+/shard/{site}/close in 1
#   in: quiet devices' rounds and models (the central ACL lets only this site's through).
topic fedge/v1/+/inbox/+ in 1
"""


def passwd_with(text: str, user: str, hashed: str | None) -> str:
    """A password file with ``user``'s line replaced by ``user:hashed`` (removed if None)."""
    lines = [ln for ln in text.splitlines() if ln.strip() and ln.split(":", 1)[0] != user]
    if hashed is not None:
        lines.append(f"{user}:{hashed}")
    return "".join(f"{ln}\n" for ln in lines)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def agent_toml(
    device_id: str,
    fleet: str,
    *,
    broker_host: str,
    model: str,
    data: str | None,
    serial_port: str | None,
    task: str,
    password: bool,
    he: bool = False,
) -> str:
    """The bundle's agent.toml; its relative paths name files beside it in the bundle.
    ``he``: the bundle carries the fleet's he.secret (homomorphic encryption)."""
    port = PASSWORD_PORT if password else TLS_PORT
    top: dict[str, object] = {
        "device_id": device_id,
        "fleet": fleet,
        "broker": f"mqtts://{broker_host}:{port}",
        "model": f"{MODELS_DIR}/{model}",
    }
    if serial_port is None:
        top["data"] = data
    top["state_dir"] = STATE_DIR
    top["aggregator_keys"] = ["aggregator.pub"]
    tls: dict[str, object] = {"ca_file": "ca.crt"}
    if password:
        tls |= {"username": device_id, "password_file": "password"}
    else:
        tls |= {"cert_file": "device.crt", "key_file": "device.key"}
    tls["verify_hostname"] = True
    tables: dict[str, dict[str, object]] = {"tls": tls}
    if serial_port is not None:
        tables["serial"] = {"port": serial_port}
        tables["task"] = {"kind": task}
    if he:
        tables["he"] = {"key_file": HE_SECRET}
    how = (
        [
            f"# The broker knows it by username and password on port {PASSWORD_PORT}; its",
            f"# device.crt and device.key would also do, on port {TLS_PORT}.",
        ]
        if password
        else [f"# The broker knows it by its client certificate, on port {TLS_PORT}."]
    )
    out = [
        f"# fedge agent {device_id}, written by `fedge provision`. Relative paths are resolved",
        "# against this file's folder (deploy/install.sh --bundle puts it all in /etc/fedge/).",
        *how,
    ]
    out += [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for name, table in tables.items():
        out += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(out) + "\n"


def watch_toml(ident: str, fleet: str, *, broker_host: str, password: bool) -> str:
    """An operator bundle's watch.toml, for ``fedge status --config watch.toml``."""
    port = PASSWORD_PORT if password else TLS_PORT
    tls: dict[str, object] = {"ca_file": "ca.crt"}
    if password:
        tls |= {"username": ident, "password_file": "password"}
    else:
        tls |= {"cert_file": "device.crt", "key_file": "device.key"}
    out = [
        f"# fedge status for operator {ident}, written by `fedge provision --operator`: it may",
        "# read the fleet's status and round topics, and write nothing.",
        f"fleet = {_toml_value(fleet)}",
        f'broker = "mqtts://{broker_host}:{port}"',
        "",
        "[tls]",
        *(f"{k} = {_toml_value(v)}" for k, v in tls.items()),
    ]
    return "\n".join(out) + "\n"


def worker_toml(site: str, fleet: str, *, site_host: str, model: str) -> str:
    """A site gateway bundle's aggregator.toml: the worker ``site`` on the site's broker."""
    top: dict[str, object] = {
        "fleet": fleet,
        "broker": f"mqtts://{site_host}:{TLS_PORT}",
        "model": f"{MODELS_DIR}/{model}",
        "state_dir": AGGREGATOR_STATE,
        "aggregator_keys": ["aggregator.pub"],
    }
    tables: dict[str, dict[str, object]] = {
        "tls": {"ca_file": "ca.crt", "cert_file": "worker.crt", "key_file": "worker.key"},
        "shards": {"workers": [site]},
    }
    out = [
        f"# fedge aggregator --worker {site} on site gateway {site}, written by `fedge provision",
        "# --site-gateway`: it takes the site's updates from the site's broker (as the identity",
        f"# {worker_id(site)}) and sends the coordinator one partial sum a round. It checks the",
        "# announcements with the aggregator's public key and holds no signing key. Its model",
        "# must be the coordinator's. Relative paths are resolved against this file's folder.",
    ]
    out += [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for name, table in tables.items():
        out += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(out) + "\n"


# -- files ------------------------------------------------------------------------------------


def _write(path: Path, data: bytes | str, mode: int = 0o644) -> Change:
    """Replace ``path`` atomically: a temporary file created with ``mode``, fsync, rename, and
    an fsync of the folder so the rename survives a power cut."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # left by a crash; we hold the PKI lock
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return Change("wrote", path)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _locked(pki: Path) -> Iterator[None]:
    fd = os.open(pki / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ProvisionError(
            f"{path} is missing: run `fedge provision --init` on this folder first"
        ) from exc


def read_registry(pki_dir: str | Path) -> dict[str, Any]:
    """devices.json: ``{"fleet": F, "devices": {id: {fleet, serial, max_samples, revoked,
    role}}}``."""
    path = Path(pki_dir) / "devices.json"
    try:
        registry = json.loads(_read(path))
    except json.JSONDecodeError as exc:
        raise ProvisionError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(registry, dict) or not isinstance(registry.get("devices"), dict):
        raise ProvisionError(f"{path}: not a fedge device registry")
    return registry


def _load_ca(pki: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = serialization.load_pem_private_key(_read(pki / "ca.key"), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ProvisionError(f"{pki / 'ca.key'} is not an EC private key")
    return key, x509.load_pem_x509_certificate(_read(pki / "ca.crt"))


def _broker_host(pki: Path) -> str:
    """The first name in the broker certificate's SANs: what devices connect to by default."""
    cert = x509.load_pem_x509_certificate(_read(pki / "server.crt"))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = [str(n.value) for n in sans if isinstance(n, (x509.DNSName, x509.IPAddress))]
    return names[0]


def _add_to_crl(
    pki: Path,
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    serial: int,
    reason: x509.ReasonFlags,
    now: dt.datetime | None,
) -> Change | None:
    crl = x509.load_pem_x509_crl(_read(pki / "ca.crl"))
    if crl.get_revoked_certificate_by_serial_number(serial) is not None:
        return None
    entries = [*crl, revoked_entry(serial, reason, now=now)]
    new = make_crl(*ca, entries, now=now)
    return _write(pki / "ca.crl", new.public_bytes(serialization.Encoding.PEM))


def _live(registry: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {d: e for d, e in registry["devices"].items() if not e["revoked"]}


def live_sites(registry: Mapping[str, Any]) -> dict[str, list[str]]:
    """Site gateway -> its live devices, for the sites that are not revoked."""
    live = _live(registry)
    sites: dict[str, list[str]] = {
        d: [] for d, e in live.items() if e.get("role") == "site-gateway"
    }
    for device, entry in live.items():
        if entry.get("site") in sites:
            sites[entry["site"]].append(device)
    return sites


def _write_changed(path: Path, data: bytes | str, mode: int = 0o644) -> Change | None:
    raw = data.encode() if isinstance(data, str) else data
    if path.is_file() and path.read_bytes() == raw and (path.stat().st_mode & 0o777) == mode:
        return None
    return _write(path, raw, mode)


def _save_registry_acl(pki: Path, registry: dict[str, Any]) -> list[Change]:
    """devices.json and the central fedge.acl; each live site's fedge.acl and CRL copy."""
    live = _live(registry)
    sites = live_sites(registry)
    # A device of a site is never central, not even once its site is revoked (its bundle names
    # the site broker): it has no broker until it is provisioned again.
    central = {d: e.get("role", "device") for d, e in live.items() if "site" not in e}
    changes: list[Change | None] = [
        _write(pki / "devices.json", json.dumps(registry, indent=2, sort_keys=True) + "\n", 0o600),
        _write(pki / "fedge.acl", acl_text(registry["fleet"], central, sites)),
    ]
    crl = _read(pki / "ca.crl")
    for site, devices in sites.items():
        folder = pki / SITES / site
        if folder.is_dir():
            acl = site_acl_text(registry["fleet"], site, devices)
            changes.append(_write_changed(folder / "fedge.acl", acl))
            changes.append(_write_changed(folder / "ca.crl", crl))
    return [c for c in changes if c is not None]


def _set_password(folder: Path, user: str, hashed: str | None) -> Change | None:
    path = folder / "passwd"
    old = _read(path).decode()
    new = passwd_with(old, user, hashed)
    return None if new == old else _write(path, new, 0o600)


def _set_passwords(
    pki: Path, registry: Mapping[str, Any], user: str, hashed: str | None, site: str | None
) -> list[Change | None]:
    """``user``'s password in the passwd of its broker (the central one, or ``site``'s), and
    out of every other broker's."""
    folders = [pki] + [pki / SITES / s for s in live_sites(registry)]
    target = pki / SITES / site if site is not None else pki
    return [
        _set_password(f, user, hashed if f == target else None)
        for f in folders
        if f == pki or f.is_dir()
    ]


# -- the three operations ---------------------------------------------------------------------


def init_fleet(
    pki_dir: str | Path,
    fleet: str,
    server_names: Sequence[str] = DEFAULT_SERVER_NAMES,
    days: int = LEAF_DAYS,
    *,
    force: bool = False,
    now: dt.datetime | None = None,
) -> list[Change]:
    """Make a new PKI for ``fleet`` in ``pki_dir``. An existing CA is kept (ProvisionError)
    unless ``force``; then everything is made anew and old device bundles are removed, since
    nothing the old CA signed is trusted any more."""
    check_id("fleet", fleet)
    _check_days(days)
    if not server_names:
        raise ProvisionError("give at least one server name (the broker's DNS name or IP)")
    for name in server_names:
        if not _is_ip(name):
            _check_host(name)
    pki = Path(pki_dir)
    pki.mkdir(mode=0o700, parents=True, exist_ok=True)
    changes: list[Change] = []
    with _locked(pki):
        if not force and ((pki / "ca.key").exists() or (pki / "ca.crt").exists()):
            raise ProvisionError(
                f"{pki} already has a fleet CA; use --force to replace it (every certificate"
                " it signed stops working)"
            )
        if force and (pki / "devices.json").exists():
            for device in read_registry(pki)["devices"]:
                bundle = pki / "devices" / check_id("device id", device)
                if bundle.is_dir():
                    shutil.rmtree(bundle)
                    changes.append(Change("removed", bundle))
        ca_key = new_ec_key()
        ca_cert = make_ca(ca_key, fleet, now=now)
        changes.append(_write(pki / "ca.key", key_pem(ca_key), 0o600))
        changes.append(_write(pki / "ca.crt", cert_pem(ca_cert)))
        for stem, cn, names in (
            ("server", server_names[0], server_names),
            ("aggregator", AGGREGATOR, ()),
        ):
            key = new_ec_key()
            cert = issue_certificate(
                ca_key, ca_cert, key.public_key(), cn, server_names=names, days=days, now=now
            )
            changes.append(_write(pki / f"{stem}.key", key_pem(key), 0o600))
            changes.append(_write(pki / f"{stem}.crt", cert_pem(cert)))
        signing = ed25519.Ed25519PrivateKey.generate()
        public = signing.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        changes.append(_write(pki / "signing.key", key_pem(signing), 0o600))
        changes.append(_write(pki / "signing.pub", public))
        crl = make_crl(ca_key, ca_cert, now=now)
        changes.append(_write(pki / "ca.crl", crl.public_bytes(serialization.Encoding.PEM)))
        changes.append(_write(pki / "passwd", "", 0o600))
        changes += _save_registry_acl(pki, {"fleet": fleet, "devices": {}})
    return changes


def provision_device(
    pki_dir: str | Path,
    device_id: str,
    fleet: str,
    *,
    force: bool = False,
    password: bool = False,
    gateway: bool = False,
    site_gateway: bool = False,
    operator: bool = False,
    site: str | None = None,
    server_names: Sequence[str] = (),
    model: str | None = None,
    data: str = DEVICE_DATA,
    serial_port: str | None = None,
    task: str = "forecast",
    max_samples: int | None = None,
    broker_host: str | None = None,
    days: int = LEAF_DAYS,
    now: dt.datetime | None = None,
) -> list[Change]:
    """Issue ``device_id`` a client certificate and write its bundle to PKI/devices/<id>/.

    The bundle's agent.toml reads ``data`` (a .npz on the device), or a sensor on
    ``serial_port`` with a ``task``; ``model`` is a file name under /opt/fedge/models/.
    ``password`` adds a broker password (bundle file ``password``, hash in PKI/passwd) and
    points agent.toml at the password listener. ``site`` puts the device behind that site
    gateway: it connects to the site's broker (its ACL and passwd, not the central ones).
    ``gateway`` makes a bridge identity instead (it may write every device's update and
    status; its bundle has no agent.toml);
    ``site_gateway`` a site gateway named ``device_id``: its broker's files in PKI/sites/<id>/
    (a server certificate for ``server_names``, the site ACL, a bridge certificate and
    bridge.conf for the central broker at ``broker_host``), and the bundle of its worker, the
    shard worker ``device_id`` (aggregator.toml, a certificate with CN ``<id>.worker``);
    ``operator`` a read-only identity for ``fedge status`` (its bundle has a watch.toml).
    ``force`` replaces an existing device; its old certificates go on the CRL.
    """
    check_device_id(device_id)
    check_id("fleet", fleet)
    _check_days(days)
    if gateway + site_gateway + operator > 1:
        raise ProvisionError("an identity is one of a gateway, a site gateway or an operator")
    if site is not None and (gateway or site_gateway or operator):
        raise ProvisionError("--site places a device behind a site gateway; not a gateway")
    if server_names and not site_gateway:
        raise ProvisionError("server names are for --init (the central broker) or --site-gateway")
    if site_gateway and password:
        raise ProvisionError("a site gateway's bridge and worker use certificates, not passwords")
    if site_gateway and len(worker_id(device_id)) > 64:
        raise ProvisionError(f"site {device_id!r}: at most {64 - len(WORKER_SUFFIX)} characters")
    for name in server_names:
        _check_host(name)
    if task not in TASK_KINDS:
        raise ProvisionError(f"task must be one of {', '.join(TASK_KINDS)}, not {task!r}")
    if max_samples is not None and max_samples < 1:
        raise ProvisionError(f"max_samples must be at least 1, got {max_samples}")
    model = model or (SERIAL_MODEL if serial_port else DATA_MODEL)
    model = model if model.endswith(".tflite") else f"{model}.tflite"
    if _FILE_NAME.fullmatch(model) is None or model.startswith("."):
        raise ProvisionError(f"model {model!r} must be a file name (it goes in {MODELS_DIR}/)")
    pki = Path(pki_dir)
    if not pki.is_dir():
        raise ProvisionError(f"{pki} does not exist: run `fedge provision --init` first")
    changes: list[Change | None] = []
    with _locked(pki):
        registry = read_registry(pki)
        if registry["fleet"] != fleet:
            raise ProvisionError(f"{pki} is the PKI of fleet {registry['fleet']!r}, not {fleet!r}")
        if site is not None and site not in live_sites(registry):
            raise ProvisionError(
                f"no site gateway {site!r} in {pki / 'devices.json'}: provision it first"
                f" (fedge provision {site} --site-gateway)"
            )
        old = registry["devices"].get(device_id)
        bundle = pki / "devices" / device_id
        if not force and (old is not None or bundle.exists()):
            state = "was revoked" if old and old["revoked"] else "is already provisioned"
            raise ProvisionError(
                f"device {device_id} {state} in {pki}; use --force to issue it a new certificate"
            )
        broker_files = pki / SITES / site if site is not None else pki
        host = _check_host(broker_host or _broker_host(broker_files))
        ca = _load_ca(pki)
        key = new_ec_key()
        cert = issue_certificate(*ca, key.public_key(), device_id, days=days, now=now)
        entry: dict[str, Any] = {
            "fleet": fleet,
            "serial": format(cert.serial_number, "x"),
            "max_samples": max_samples,
            "revoked": False,
            "role": "operator"
            if operator
            else "gateway"
            if gateway
            else "site-gateway"
            if site_gateway
            else "device",
        }
        if site is not None:
            entry["site"] = site

        if bundle.exists():
            shutil.rmtree(bundle)
        bundle.mkdir(mode=0o700, parents=True)
        changes.append(_write(bundle / "ca.crt", cert_pem(ca[1])))
        if site_gateway:
            names = list(server_names) or list(DEFAULT_SERVER_NAMES)
            serials, made = _site_gateway_files(
                pki, bundle, device_id, fleet, ca, (key, cert), names, host, model, days, now
            )
            entry |= serials
            changes += made
        else:
            changes.append(_write(bundle / "device.key", key_pem(key), 0o600))
            changes.append(_write(bundle / "device.crt", cert_pem(cert)))
        if operator:
            toml = watch_toml(device_id, fleet, broker_host=host, password=password)
            changes.append(_write(bundle / "watch.toml", toml))
        elif not (gateway or site_gateway):
            changes.append(_write(bundle / "aggregator.pub", _read(pki / "signing.pub")))
            he_keys = (pki / HE_SECRET).exists()
            if he_keys:  # devices decrypt the global model; nobody else
                changes.append(_write(bundle / HE_SECRET, _read(pki / HE_SECRET), 0o600))
            toml = agent_toml(
                device_id,
                fleet,
                broker_host=host,
                model=model,
                data=data,
                serial_port=serial_port,
                task=task,
                password=password,
                he=he_keys,
            )
            changes.append(_write(bundle / "agent.toml", toml))
        secret = secrets.token_urlsafe(24) if password else None
        if secret is not None:
            changes.append(_write(bundle / "password", secret, 0o600))

        if old is not None and not old["revoked"]:
            changes += _revoke_serials(pki, ca, old, x509.ReasonFlags.superseded, now)
        registry["devices"][device_id] = entry
        changes += _save_registry_acl(pki, registry)
        hashed = mosquitto_password_hash(secret) if secret is not None else None
        changes += _set_passwords(pki, registry, device_id, hashed, site)
    return [c for c in changes if c is not None]


def _site_gateway_files(
    pki: Path,
    bundle: Path,
    site: str,
    fleet: str,
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    bridge: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    server_names: Sequence[str],
    central_host: str,
    model: str,
    days: int,
    now: dt.datetime | None,
) -> tuple[dict[str, str], list[Change | None]]:
    """PKI/sites/<site>/ (the site broker's certificate, the bridge's certificate and
    bridge.conf; its passwd is kept across --force) and the worker's bundle. Returns the new
    certificates' serials for the registry."""
    folder = pki / SITES / site
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    server_key, worker_key = new_ec_key(), new_ec_key()
    server = issue_certificate(
        *ca, server_key.public_key(), server_names[0], server_names=server_names, days=days, now=now
    )
    worker = issue_certificate(*ca, worker_key.public_key(), worker_id(site), days=days, now=now)
    changes: list[Change | None] = [
        _write(folder / "ca.crt", cert_pem(ca[1])),
        _write(folder / "server.key", key_pem(server_key), 0o600),
        _write(folder / "server.crt", cert_pem(server)),
        _write(folder / "bridge.key", key_pem(bridge[0]), 0o600),
        _write(folder / "bridge.crt", cert_pem(bridge[1])),
        _write(folder / "bridge.conf", bridge_conf_text(site, central_host)),
        None if (folder / "passwd").exists() else _write(folder / "passwd", "", 0o600),
        _write(bundle / "worker.key", key_pem(worker_key), 0o600),
        _write(bundle / "worker.crt", cert_pem(worker)),
        _write(bundle / "aggregator.pub", _read(pki / "signing.pub")),
        _write(
            bundle / "aggregator.toml",
            worker_toml(site, fleet, site_host=server_names[0], model=model),
        ),
    ]
    serials = {
        "worker_serial": format(worker.serial_number, "x"),
        "server_serial": format(server.serial_number, "x"),
    }
    return serials, changes


def _revoke_serials(
    pki: Path,
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    entry: Mapping[str, Any],
    reason: x509.ReasonFlags,
    now: dt.datetime | None,
) -> list[Change | None]:
    """Every certificate of a registry entry on the CRL (a site gateway has three)."""
    keys = ("serial", "worker_serial", "server_serial")
    return [_add_to_crl(pki, ca, int(entry[k], 16), reason, now) for k in keys if k in entry]


def init_he_keys(pki_dir: str | Path, *, force: bool = False) -> list[Change]:
    """Make the fleet's CKKS key files in the PKI (homomorphic encryption of updates):
    ``he.secret`` for the devices (copied into each bundle ``provision_device`` makes from now
    on) and ``he.public`` for the aggregator. Existing keys are kept unless ``force``: new keys
    make every device bundle made before them useless for HE, so re-provision the devices.
    Needs ``fedge[he]``; without it, one ProvisionError line saying so."""
    from fedge.protocol import he

    pki = Path(pki_dir)
    if not (pki / "devices.json").exists():
        raise ProvisionError(f"{pki} has no fleet: run `fedge provision --init` first")
    with _locked(pki):
        if not force and (pki / HE_SECRET).exists():
            raise ProvisionError(
                f"{pki} already has HE keys; use --force to replace them (every device must"
                " then get a new bundle)"
            )
        try:
            files = he.generate_keys()
        except he.HeError as exc:
            raise ProvisionError(str(exc)) from exc
        return [
            _write(pki / HE_SECRET, files.secret, 0o600),
            _write(pki / HE_PUBLIC, files.public, 0o644),
        ]


def revoke_device(
    pki_dir: str | Path, device_id: str, *, now: dt.datetime | None = None
) -> list[Change]:
    """Revoke ``device_id``: registry, CRL (re-signed), ACL block, password line, bundle (and
    a site gateway's broker folder; its devices then have no broker until provisioned again).
    Revoking again changes nothing and is not an error; an unknown device is."""
    check_id("device id", device_id)
    pki = Path(pki_dir)
    changes: list[Change | None] = []
    with _locked(pki):
        registry = read_registry(pki)
        entry = registry["devices"].get(device_id)
        if entry is None:
            raise ProvisionError(f"no device {device_id} in {pki / 'devices.json'}")
        ca = _load_ca(pki)
        reason = x509.ReasonFlags.cessation_of_operation
        changes += _revoke_serials(pki, ca, entry, reason, now)
        changes += _set_passwords(pki, registry, device_id, None, None)
        if not entry["revoked"]:
            entry["revoked"] = True
            changes += _save_registry_acl(pki, registry)
        folders = [pki / "devices" / device_id]
        if entry.get("role") == "site-gateway":
            folders.append(pki / SITES / device_id)
        for folder in folders:
            if folder.is_dir():
                shutil.rmtree(folder)
                changes.append(Change("removed", folder))
    return [c for c in changes if c is not None]

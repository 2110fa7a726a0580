"""The link over TLS against production.conf: what connects, and the one line that says why
something does not."""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from fedge.protocol import LinkError, TlsSettings, make_link
from fedge.protocol.link import tls_context

from fedge.provision import init_fleet, provision_device

pytestmark = pytest.mark.broker
FLEET = "tls"
# paho drops the socket of a failed TLS handshake without closing it (its reconnect loop makes
# one a second); CPython closes it at once, with a ResourceWarning that is an error here.
paho_leaks_failed_handshakes = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pki = tmp_path_factory.mktemp("pki")
    init_fleet(pki, FLEET, server_names=("localhost",))  # no IP address in the certificate
    provision_device(pki, "dev-1", FLEET)
    provision_device(pki, "dev-pw", FLEET, password=True)
    other = tmp_path_factory.mktemp("other-pki")
    init_fleet(other, "elsewhere")
    return pki


@pytest.fixture(scope="module")
def broker(pki: Path) -> Iterator[object]:
    from mosquitto import MosquittoServer

    with MosquittoServer.production(pki) as server:
        yield server


def device_tls(pki: Path, **kw: object) -> TlsSettings:
    bundle = pki / "devices" / "dev-1"
    return TlsSettings(
        ca_file=str(bundle / "ca.crt"),
        cert_file=str(bundle / "device.crt"),
        key_file=str(bundle / "device.key"),
        **kw,  # type: ignore[arg-type]
    )


def test_a_device_connects_by_name_with_hostname_verification(pki: Path, broker) -> None:  # type: ignore[no-untyped-def]
    link = make_link(f"mqtts://localhost:{broker.tls_port}", "dev-1", tls=device_tls(pki))
    link.connect(timeout=5)
    assert link.connected
    sock = link._client.socket()  # type: ignore[attr-defined]
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1  # under TLS too
    link.close()


@paho_leaks_failed_handshakes
def test_a_host_the_certificate_does_not_name_is_refused_unless_told(pki: Path, broker) -> None:  # type: ignore[no-untyped-def]
    url = f"mqtts://127.0.0.1:{broker.tls_port}"
    link = make_link(url, "dev-1", tls=device_tls(pki))
    with pytest.raises(LinkError, match="TLS: CERTIFICATE_VERIFY_FAILED"):
        link.connect(timeout=2)
    lax = make_link(url, "dev-1", tls=device_tls(pki, verify_hostname=False))
    lax.connect(timeout=5)
    lax.close()


@paho_leaks_failed_handshakes
def test_an_untrusted_broker_is_refused_with_the_reason(pki: Path, broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    other_ca = pki.parent / "other-pki0" / "ca.crt"
    if not other_ca.exists():  # tmp_path_factory numbers folders; find the other fleet's CA
        [other_ca] = [p for p in pki.parent.glob("other-pki*/ca.crt")]
    tls = TlsSettings(ca_file=str(other_ca))
    link = make_link(f"mqtts://localhost:{broker.tls_port}", "dev-1", tls=tls)
    with pytest.raises(LinkError, match="CERTIFICATE_VERIFY_FAILED"):
        link.connect(timeout=2)


def test_password_listener_takes_the_password_and_refuses_a_wrong_one(pki: Path, broker) -> None:  # type: ignore[no-untyped-def]
    bundle = pki / "devices" / "dev-pw"
    url = f"mqtts://localhost:{broker.password_port}"
    tls = TlsSettings(ca_file=str(bundle / "ca.crt"))
    good = make_link(
        url, "dev-pw", tls=tls, username="dev-pw", password=(bundle / "password").read_text()
    )
    good.connect(timeout=5)
    good.close()
    bad = make_link(url, "dev-pw", tls=tls, username="dev-pw", password="not-it")
    with pytest.raises(LinkError, match="refused: Not authorized"):
        bad.connect(timeout=5)


def test_the_context_speaks_tls_1_2_or_newer_and_checks_by_default(pki: Path) -> None:
    context = tls_context(device_tls(pki))
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("url", "tls", "message"),
    [
        ("mqtt://h:1883", TlsSettings(), "plain MQTT but TLS settings were given"),
        ("mqtts://h:99999", None, "bad broker url"),
        ("ws://h", None, "want mqtt://host[:port] or mqtts://host[:port]"),
    ],
)
def test_make_link_refuses_what_it_would_silently_ignore(
    url: str, tls: TlsSettings | None, message: str
) -> None:
    with pytest.raises(LinkError, match=re.escape(message)):
        make_link(url, "c", tls=tls)


@paho_leaks_failed_handshakes
def test_a_client_certificate_the_broker_refuses_is_named(pki: Path, broker) -> None:  # type: ignore[no-untyped-def]
    other = next(pki.parent.glob("other-pki*"))
    provision_device(other, "dev-1", "elsewhere")
    bundle = other / "devices" / "dev-1"
    tls = TlsSettings(
        ca_file=str(pki / "ca.crt"),  # the right broker, a certificate of another fleet's CA
        cert_file=str(bundle / "device.crt"),
        key_file=str(bundle / "device.key"),
    )
    link = make_link(f"mqtts://localhost:{broker.tls_port}", "dev-1", tls=tls)
    with pytest.raises(LinkError) as err:
        link.connect(timeout=2)
    assert "TLS: TLSV1_ALERT_UNKNOWN_CA" in str(err.value), err.value  # the broker's alert
    no_cert = make_link(
        f"mqtts://localhost:{broker.tls_port}",
        "dev-1",
        tls=TlsSettings(ca_file=str(pki / "ca.crt")),
    )
    with pytest.raises(LinkError) as err:
        no_cert.connect(timeout=2)
    assert "TLS: TLSV13_ALERT_CERTIFICATE_REQUIRED" in str(err.value), err.value

"""broker_config/production.conf on a real Mosquitto with a PKI from fedge.provision.

Plain paho clients (MQTT 3.1.1, TLS contexts from the PKI) show who gets in and who hears
what. A denied publish still gets a plain PUBACK under MQTT 3.1.1, so "never reaches a
subscriber" is shown with a sentinel: a permitted message sent after the forged ones arrives,
and nothing forged arrived before it (Mosquitto delivers one client's messages in order).
"""

from __future__ import annotations

import gc
import queue
import ssl
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from fedge.provision import init_fleet, provision_device, revoke_device

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mosquitto import MosquittoServer, ProductionMosquitto

pytestmark = pytest.mark.broker
FLEET = "f1"
BASE = f"fedge/v1/{FLEET}"
WAIT_S = 5.0
QUIET_S = 0.3  # how long a disconnection that should not happen is given to show


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pki = tmp_path_factory.mktemp("pki")
    init_fleet(pki, FLEET)
    for device in ("dev-a", "dev-b", "dev-c", "dev-r"):
        provision_device(pki, device, FLEET)
    provision_device(pki, "dev-p", FLEET, password=True)
    provision_device(pki, "dev-q", FLEET, password=True)
    provision_device(pki, "ops", FLEET, operator=True)
    return pki


@pytest.fixture(scope="module")
def broker(pki: Path) -> Iterator[ProductionMosquitto]:
    with MosquittoServer.production(pki) as server:
        yield server


class Client:
    """A paho client whose CONNACK, disconnects and messages the test can wait for."""

    def __init__(self, client_id: str, context: ssl.SSLContext) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.events: queue.Queue[str] = queue.Queue()
        self.paho = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,  # a refused client stops instead of retrying
        )
        self.paho.tls_set_context(context)
        self.paho.on_connect = lambda c, u, f, rc, p: self.events.put(f"connack {rc}")
        self.paho.on_disconnect = lambda c, u, f, rc, p: self.events.put(f"disconnect {rc}")
        self.paho.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))

    def connect(self, port: int, username: str | None = None, password: str | None = None) -> str:
        """ "connack Success", or why not: a refusal code, a disconnect, or a TLS error."""
        if username is not None:
            self.paho.username_pw_set(username, password)
        with warnings.catch_warnings():
            # paho leaves the socket of a failed TLS handshake to the garbage collector.
            warnings.simplefilter("ignore", ResourceWarning)
            try:
                self.paho.connect("127.0.0.1", port, keepalive=10)
                failure = ""
            except OSError as exc:  # ssl.SSLError is one
                failure = f"failed {exc.__class__.__name__}"
            gc.collect()
        if failure:
            return failure
        self.paho.loop_start()
        try:
            return self.events.get(timeout=WAIT_S)
        except queue.Empty:
            return "no answer"

    def subscribe(self, *filters: str) -> None:
        for topic_filter in filters:
            result, _mid = self.paho.subscribe(topic_filter, qos=1)
            assert result == mqtt.MQTT_ERR_SUCCESS
        # SUBACKs come back in order; a round trip after the last one proves they are in place.
        self.publish_and_wait(f"{BASE}/nowhere", b"")

    def publish_and_wait(self, topic: str, payload: bytes) -> None:
        self.paho.publish(topic, payload, qos=1).wait_for_publish(timeout=WAIT_S)

    def received_until(self, sentinel: bytes) -> list[tuple[str, bytes]]:
        """Every message up to and including the one with payload ``sentinel``."""
        got: list[tuple[str, bytes]] = []
        while not got or got[-1][1] != sentinel:
            got.append(self.messages.get(timeout=WAIT_S))
        return got

    def still_connected(self) -> bool:
        try:
            event = self.events.get(timeout=QUIET_S)
        except queue.Empty:
            return self.paho.is_connected()
        return not event.startswith("disconnect")

    def close(self) -> None:
        self.paho.disconnect()
        self.paho.loop_stop()


def context(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)  # checks the host name too
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def identity(pki: Path, name: str) -> ssl.SSLContext:
    """The TLS context of the aggregator or a provisioned device."""
    if name == "aggregator":
        return context(pki / "ca.crt", pki / "aggregator.crt", pki / "aggregator.key")
    bundle = pki / "devices" / name
    return context(bundle / "ca.crt", bundle / "device.crt", bundle / "device.key")


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for client in made:
        client.close()


@pytest.fixture
def connect(pki: Path, broker: ProductionMosquitto, clients: list[Client]):  # type: ignore[no-untyped-def]
    """connect(name) -> a connected Client with that identity's certificate."""

    def connect(name: str, client_id: str | None = None) -> Client:
        client = Client(client_id or name, identity(pki, name))
        clients.append(client)
        assert client.connect(broker.tls_port) == "connack Success", name
        return client

    return connect


def test_the_aggregator_and_each_device_connect_with_their_certificates(connect) -> None:  # type: ignore[no-untyped-def]
    for name in ("aggregator", "dev-a", "dev-b", "dev-c"):
        connect(name)


def test_a_device_with_a_password_connects_on_the_password_listener(
    pki: Path, broker: ProductionMosquitto, clients: list[Client]
) -> None:
    client = Client("dev-p", context(pki / "ca.crt"))
    clients.append(client)
    password = (pki / "devices" / "dev-p" / "password").read_text()
    assert client.connect(broker.password_port, "dev-p", password) == "connack Success"


def test_a_device_publishes_only_its_own_update_and_status(connect) -> None:  # type: ignore[no-untyped-def]
    aggregator = connect("aggregator")
    aggregator.subscribe(f"{BASE}/update/+", f"{BASE}/status/+")
    dev_b = connect("dev-b")
    dev_b.subscribe(f"{BASE}/round", f"{BASE}/global")
    dev_a = connect("dev-a")

    for topic in ("update/dev-b", "status/dev-b", "round", "global"):
        dev_a.publish_and_wait(f"{BASE}/{topic}", b"forged by dev-a")
    dev_a.publish_and_wait(f"{BASE}/update/dev-a", b"own update")
    dev_a.publish_and_wait(f"{BASE}/status/dev-a", b"own status")
    aggregator.publish_and_wait(f"{BASE}/round", b"real round")

    assert aggregator.received_until(b"own status") == [
        (f"{BASE}/update/dev-a", b"own update"),
        (f"{BASE}/status/dev-a", b"own status"),
    ]
    assert dev_b.received_until(b"real round") == [(f"{BASE}/round", b"real round")]


def test_a_device_cannot_read_another_devices_topics(connect) -> None:  # type: ignore[no-untyped-def]
    aggregator = connect("aggregator")
    aggregator.subscribe(f"{BASE}/update/+")
    dev_b = connect("dev-b")
    dev_b.subscribe(f"{BASE}/update/dev-a", f"{BASE}/update/+", f"{BASE}/status/+", "#")
    dev_a = connect("dev-a")

    dev_a.publish_and_wait(f"{BASE}/update/dev-a", b"for the aggregator only")
    aggregator.received_until(b"for the aggregator only")
    aggregator.publish_and_wait(f"{BASE}/global", b"model")

    assert dev_b.received_until(b"model") == [(f"{BASE}/global", b"model")]


def test_an_operator_reads_statuses_and_writes_nothing(connect) -> None:  # type: ignore[no-untyped-def]
    aggregator = connect("aggregator")
    aggregator.subscribe(f"{BASE}/update/+", f"{BASE}/status/+", f"{BASE}/round")
    ops = connect("ops")
    ops.subscribe(f"{BASE}/status/+", f"{BASE}/round", f"{BASE}/update/+", f"{BASE}/global")
    dev_a = connect("dev-a")

    for topic in ("status/ops", "update/ops", "round", "global"):
        ops.publish_and_wait(f"{BASE}/{topic}", b"forged by ops")
    dev_a.publish_and_wait(f"{BASE}/update/dev-a", b"update")
    dev_a.publish_and_wait(f"{BASE}/status/dev-a", b"status")
    aggregator.publish_and_wait(f"{BASE}/round", b"round")

    assert ops.received_until(b"round") == [
        (f"{BASE}/status/dev-a", b"status"),
        (f"{BASE}/round", b"round"),
    ]
    assert aggregator.received_until(b"round") == [
        (f"{BASE}/update/dev-a", b"update"),
        (f"{BASE}/status/dev-a", b"status"),
        (f"{BASE}/round", b"round"),
    ]


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another fleet CA that issued its own "dev-a" and "aggregator" certificates."""
    other = tmp_path_factory.mktemp("other-pki")
    init_fleet(other, FLEET)
    provision_device(other, "dev-a", FLEET)
    return other


# What each refusal looks like to a client, as seen with Mosquitto 2.0 (TLS 1.3): the broker
# checks a client certificate after the client's side of the handshake is done, so a missing or
# foreign one shows as the connection dropped before any CONNACK (paho: "Unspecified error");
# a client that does not trust the broker stops in the handshake; the password listener
# answers with a CONNACK refusal. Neither "no answer" nor a refused TCP connection is any of them.
DROPPED = "disconnect Unspecified error"
UNTRUSTED_BROKER = f"failed {ssl.SSLCertVerificationError.__name__}"
NOT_AUTHORIZED = "connack Not authorized"


@pytest.mark.parametrize(
    ("who", "outcome"),
    [
        ("certificate from another CA", DROPPED),
        ("aggregator certificate from another CA", DROPPED),
        ("no client certificate", DROPPED),
        ("client does not trust the server's CA", UNTRUSTED_BROKER),
        ("password listener: wrong password", NOT_AUTHORIZED),
        ("password listener: no credentials", NOT_AUTHORIZED),
        ("password listener: a certificate but no password", NOT_AUTHORIZED),
        ("password listener: a certificate user's name", NOT_AUTHORIZED),
    ],
)
def test_strangers_cannot_connect(
    who: str,
    outcome: str,
    pki: Path,
    other_pki: Path,
    broker: ProductionMosquitto,
    clients: list[Client],
) -> None:
    ca, bundle = pki / "ca.crt", pki / "devices" / "dev-a"
    port, username, password = broker.tls_port, None, None
    if who == "certificate from another CA":
        ctx = identity(other_pki, "dev-a")
        ctx.load_verify_locations(ca)  # it trusts the broker; the broker does not trust it
    elif who == "aggregator certificate from another CA":
        ctx = context(ca, other_pki / "aggregator.crt", other_pki / "aggregator.key")
    elif who == "no client certificate":
        ctx = context(ca)
    elif who == "client does not trust the server's CA":
        ctx = context(other_pki / "ca.crt", bundle / "device.crt", bundle / "device.key")
    else:
        port = broker.password_port
        ctx = context(ca, bundle / "device.crt", bundle / "device.key")
        username, password = {
            "password listener: wrong password": ("dev-p", "not-the-password"),
            "password listener: no credentials": (None, None),
            "password listener: a certificate but no password": ("dev-a", None),
            "password listener: a certificate user's name": ("aggregator", ""),
        }[who]
    client = Client("dev-a", ctx)
    clients.append(client)

    assert client.connect(port, username, password) == outcome


def test_a_revoked_device_is_refused_once_the_broker_reloads(
    pki: Path,
    broker: ProductionMosquitto,
    connect,
    clients: list[Client],  # type: ignore[no-untyped-def]
) -> None:
    saved = {name: identity(pki, name) for name in ("dev-r",)}  # the bundle is deleted below
    password = (pki / "devices" / "dev-q" / "password").read_text()
    listening = connect("dev-r")  # connected before the revocation
    listening.subscribe(f"{BASE}/round")
    dev_b = connect("dev-b")
    dev_b.subscribe(f"{BASE}/round")

    revoke_device(pki, "dev-r")
    revoke_device(pki, "dev-q")
    early = Client("dev-r", saved["dev-r"])
    clients.append(early)
    assert early.connect(broker.tls_port) == "connack Success"  # Mosquitto has not reloaded yet

    broker.reload()  # SIGHUP: CRL, ACL and password file; no restart needed

    again = Client("dev-r-again", saved["dev-r"])
    clients.append(again)
    assert again.connect(broker.tls_port) == DROPPED  # the CRL now names its certificate
    by_password = Client("dev-q", context(pki / "ca.crt"))
    clients.append(by_password)
    assert by_password.connect(broker.password_port, "dev-q", password) == NOT_AUTHORIZED
    # Still connected from before, the revoked device has no topics left: its ACL block is gone.
    connect("aggregator").publish_and_wait(f"{BASE}/round", b"after revocation")
    assert dev_b.received_until(b"after revocation")[-1] == (f"{BASE}/round", b"after revocation")
    with pytest.raises(queue.Empty):
        listening.messages.get(timeout=QUIET_S)


@pytest.mark.parametrize("listener", ["certificate", "password"])
def test_a_device_cannot_take_over_another_devices_session(
    listener: str,
    pki: Path,
    broker: ProductionMosquitto,
    connect,
    clients: list[Client],  # type: ignore[no-untyped-def]
) -> None:
    aggregator = connect("aggregator")
    aggregator.subscribe(f"{BASE}/status/+")
    victim = connect("dev-c")
    if listener == "certificate":
        connect("dev-a", client_id="dev-c")  # use_username_as_clientid: it becomes "dev-a"
    else:
        intruder = Client("dev-c", context(pki / "ca.crt"))
        clients.append(intruder)
        password = (pki / "devices" / "dev-p" / "password").read_text()
        assert intruder.connect(broker.password_port, "dev-p", password) == "connack Success"

    assert victim.still_connected()
    victim.publish_and_wait(f"{BASE}/status/dev-c", b"still here")
    assert aggregator.received_until(b"still here")[-1] == (f"{BASE}/status/dev-c", b"still here")

"""PahoHub: many PahoLinks on one network thread, against a real Mosquitto."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from fedge.protocol import LinkError, Message, make_link
from fedge.protocol.paho_hub import PahoHub
from fedge.protocol.paho_link import PahoLink
from fedge.protocol.wire import publish_size
from helpers import receive
from mosquitto import MosquittoServer, free_port

pytestmark = pytest.mark.broker


@pytest.fixture
def hub() -> Iterator[PahoHub]:
    hub = PahoHub().start()
    yield hub
    hub.close()


def test_many_links_on_one_thread_publish_and_receive_qos1(
    mosquitto: MosquittoServer, hub: PahoHub, links: list[PahoLink], prefix: str, client_id: str
) -> None:
    threads = threading.active_count()
    subs = [
        PahoLink(mosquitto.host, mosquitto.port, f"{client_id}-{i}", clean_session=True, hub=hub)
        for i in range(50)
    ]
    links += subs
    for i, sub in enumerate(subs):
        sub.connect()
        sub.subscribe(f"{prefix}/f/round/{i}")  # returns once the broker has acked
    assert threading.active_count() == threads  # no thread per link
    assert len(hub) == 50
    pub = make_link(mosquitto.url, f"{client_id}-pub", hub=hub)
    assert isinstance(pub, PahoLink)
    links.append(pub)
    pub.connect()
    payloads = [bytes([i]) * (i * 100) for i in range(50)]
    payloads[7] = b"x" * 2_000_000  # more than a socket buffer: written over several events
    for i, payload in enumerate(payloads):
        pub.publish(f"{prefix}/f/round/{i}", payload)
    for i, sub in enumerate(subs):
        got = receive(sub, 1)
        assert [(m.topic, m.payload, m.retain) for m in got] == [
            (f"{prefix}/f/round/{i}", payloads[i], False)
        ]
        assert sub.bytes_down == publish_size(got[0].topic, len(got[0].payload), 1)
        assert sub.bytes_up == 4
    assert pub.bytes_down == 4 * len(payloads)


def test_retained_and_cleared(
    mosquitto: MosquittoServer, hub: PahoHub, links: list[PahoLink], prefix: str, client_id: str
) -> None:
    topic = f"{prefix}/f/global"
    pub = PahoLink(mosquitto.host, mosquitto.port, f"{client_id}-pub", hub=hub)
    pub.connect()
    pub.publish(topic, b"model v1", retain=True)
    pub.close()  # waits for the broker's ack, then leaves the hub
    assert len(hub) == 0
    late = PahoLink(mosquitto.host, mosquitto.port, f"{client_id}-late", hub=hub)
    links.append(late)
    late.connect()
    late.subscribe(topic)
    assert receive(late, 1) == [Message(topic, b"model v1", retain=True)]
    late.publish(topic, b"", retain=True)
    assert receive(late, 1) == [Message(topic, b"", retain=False)]


CHILD = """
import sys
from fedge.protocol import Message
from fedge.protocol.paho_hub import PahoHub
from fedge.protocol.paho_link import PahoLink

port, client_id, topic = int(sys.argv[1]), sys.argv[2], sys.argv[3]
hub = PahoHub().start()
links = [
    PahoLink("127.0.0.1", port, f"{client_id}-{i}", will=Message(f"{topic}/{i}", b"x"), hub=hub)
    for i in range(3)
]
for link in links:
    link.connect()
print("connected", flush=True)
if sys.stdin.readline().strip() == "close":
    for link in links:
        link.close()
    print("closed", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("ending", ["kill", "close"])
def test_will_when_killed_not_when_closed(
    mosquitto: MosquittoServer, links: list[PahoLink], prefix: str, client_id: str, ending: str
) -> None:
    topic = f"{prefix}/f/status"
    watcher = PahoLink(mosquitto.host, mosquitto.port, f"{client_id}-w", clean_session=True)
    links.append(watcher)
    watcher.connect()
    watcher.subscribe(f"{topic}/+")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(mosquitto.port), f"{client_id}-d", topic],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "connected"
        if ending == "kill":
            child.kill()  # SIGKILL: the sockets close without DISCONNECT
            got = receive(watcher, 3)
            assert sorted((m.topic, m.payload) for m in got) == [
                (f"{topic}/{i}", b"x") for i in range(3)
            ]
        else:
            child.stdin.write("close\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "closed"
            assert watcher.get(timeout=0.5) is None
    finally:
        child.kill()
        child.wait(timeout=10)
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()


def test_reconnect_after_broker_restart_with_birth_and_subscriptions(
    tmp_path, hub: PahoHub, links: list[PahoLink], client_id: str
) -> None:  # type: ignore[no-untyped-def]
    """Every link comes back by itself, says so with its birth message (replacing the Will
    the broker published), and its subscriptions are renewed (clean session: only the link
    can bring them back)."""
    count = 20
    with MosquittoServer(persistence=True, workdir=tmp_path) as broker:
        devs = [
            PahoLink(
                broker.host,
                broker.port,
                f"{client_id}-{i}",
                will=Message(f"fleet/status/d{i}", b"offline", retain=True),
                birth=Message(f"fleet/status/d{i}", b"online", retain=True),
                clean_session=True,
                hub=hub,
            )
            for i in range(count)
        ]
        links += devs
        for dev in devs:
            dev.connect()
            dev.subscribe("fleet/round")
        broker.restart()  # drops every client
        deadline = time.monotonic() + 15
        while not all(dev.connected for dev in devs):
            assert time.monotonic() < deadline, "not every link reconnected"
            time.sleep(0.05)
        watcher = PahoLink(broker.host, broker.port, f"{client_id}-w", clean_session=True)
        links.append(watcher)
        watcher.connect()
        watcher.subscribe("fleet/status/+")
        status = {m.topic: m.payload for m in receive(watcher, count)}
        assert status == {f"fleet/status/d{i}": b"online" for i in range(count)}
        watcher.publish("fleet/round", b"round 2")
        for dev in devs:
            assert [m.payload for m in receive(dev, 1)] == [b"round 2"]


def test_connect_failure_is_a_link_error_and_the_hub_goes_on(
    mosquitto: MosquittoServer, hub: PahoHub, links: list[PahoLink], client_id: str
) -> None:
    port = free_port()
    dead = PahoLink("127.0.0.1", port, f"{client_id}-dead", hub=hub)
    with pytest.raises(LinkError, match=rf"127\.0\.0\.1:{port}, client {client_id}-dead"):
        dead.connect(timeout=1.0)
    assert len(hub) == 0
    live = PahoLink(mosquitto.host, mosquitto.port, f"{client_id}-live", hub=hub)
    links.append(live)
    live.connect()
    assert live.connected


def test_nagle_is_off_on_hub_connections(
    mosquitto: MosquittoServer, hub: PahoHub, links: list[PahoLink], client_id: str
) -> None:
    link = PahoLink(mosquitto.host, mosquitto.port, client_id, clean_session=True, hub=hub)
    links.append(link)
    link.connect()
    sock = link._client.socket()
    assert sock is not None
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1

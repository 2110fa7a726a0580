"""PahoLink against a real Mosquitto started by the test session."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fedge.protocol import LinkError, Message, make_link, paho_link
from fedge.protocol.paho_link import PahoLink
from fedge.protocol.wire import publish_size
from helpers import receive
from mosquitto import MosquittoServer, free_port

pytestmark = pytest.mark.broker
# A link with paho's network thread, and one that its owner's calls drive (the aggregator's).
THREADS = pytest.mark.parametrize("network_thread", [True, False], ids=["thread", "driven"])


@THREADS
def test_publish_and_receive_qos1(
    mosquitto: MosquittoServer,
    links: list[PahoLink],
    prefix: str,
    client_id: str,
    network_thread: bool,
) -> None:
    sub = PahoLink(
        mosquitto.host,
        mosquitto.port,
        f"{client_id}-sub",
        clean_session=True,
        network_thread=network_thread,
    )
    pub = make_link(mosquitto.url, f"{client_id}-pub", network_thread=network_thread)
    assert isinstance(pub, PahoLink)
    links += [sub, pub]
    sub.connect()
    pub.connect()
    assert sub.connected and pub.connected
    sub.subscribe(f"{prefix}/f/update/+")  # returns once the broker has acked
    payloads = [bytes([i]) * (i * 1000) for i in range(5)] + [b"x" * 2_000_000]
    for i, payload in enumerate(payloads):
        pub.publish(f"{prefix}/f/update/d{i}", payload)
    pub.publish(f"{prefix}/f/status/d1", b"not for sub")
    got = receive(sub, len(payloads))
    assert [m.payload for m in got] == payloads
    assert [m.topic for m in got] == [f"{prefix}/f/update/d{i}" for i in range(len(payloads))]
    assert not any(m.retain for m in got)
    assert sub.get(timeout=0.2) is None
    # Whole PUBLISH packets at QoS 1, and a 4-byte PUBACK the other way for each.
    packets = sum(publish_size(m.topic, len(m.payload), 1) for m in got)
    assert sub.bytes_down == packets and sub.bytes_up == 4 * len(got)
    status = publish_size(f"{prefix}/f/status/d1", len(b"not for sub"), 1)
    assert pub.bytes_up == packets + status and pub.bytes_down == 4 * (len(got) + 1)
    # The 2 MB payload needs a 3-byte remaining length: 1 + 3 + 2 + topic + 2 + payload.
    big = f"{prefix}/f/update/d5"
    assert publish_size(big, 2_000_000, 1) == 1 + 3 + 2 + len(big) + 2 + 2_000_000


def test_retained_and_cleared(
    mosquitto: MosquittoServer, links: list[PahoLink], prefix: str, client_id: str
) -> None:
    topic = f"{prefix}/f/round"
    pub = PahoLink(mosquitto.host, mosquitto.port, f"{client_id}-pub")
    pub.connect()
    pub.publish(topic, b"round 1", retain=True)
    pub.close()  # waits for the broker's ack
    late = PahoLink(mosquitto.host, mosquitto.port, f"{client_id}-late", clean_session=True)
    links.append(late)
    late.connect()
    late.subscribe(topic)
    assert receive(late, 1) == [Message(topic, b"round 1", retain=True)]
    late.publish(topic, b"", retain=True)  # clear it
    assert receive(late, 1) == [Message(topic, b"", retain=False)]
    later = PahoLink(mosquitto.host, mosquitto.port, f"{client_id}-later", clean_session=True)
    links.append(later)
    later.connect()
    later.subscribe(topic)
    assert later.get(timeout=0.3) is None


CHILD = """
import sys
from fedge.protocol.wire import publish_size
from fedge.protocol import Message
from fedge.protocol.wire import publish_size
from fedge.protocol.paho_link import PahoLink

port, client_id, topic = int(sys.argv[1]), sys.argv[2], sys.argv[3]
link = PahoLink("127.0.0.1", port, client_id, will=Message(topic, b"offline"), keepalive=5)
link.connect()
print("connected", flush=True)
if sys.stdin.readline().strip() == "close":
    link.close()
    print("closed", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("ending", ["kill", "close"])
def test_will_when_killed_not_when_closed(
    mosquitto: MosquittoServer, links: list[PahoLink], prefix: str, client_id: str, ending: str
) -> None:
    topic = f"{prefix}/f/status/d1"
    watcher = PahoLink(mosquitto.host, mosquitto.port, f"{client_id}-w", clean_session=True)
    links.append(watcher)
    watcher.connect()
    watcher.subscribe(topic)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(mosquitto.port), f"{client_id}-d1", topic],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "connected"
        if ending == "kill":
            child.kill()  # SIGKILL: the socket closes without DISCONNECT
            assert receive(watcher, 1) == [Message(topic, b"offline")]
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


def test_persistent_session_gets_what_it_missed(
    mosquitto: MosquittoServer, links: list[PahoLink], prefix: str, client_id: str
) -> None:
    topic = f"{prefix}/f/round"
    device = PahoLink(mosquitto.host, mosquitto.port, f"{client_id}-dev")  # clean_session=False
    device.connect()
    device.subscribe(topic, qos=1)
    device.close()
    pub = PahoLink(mosquitto.host, mosquitto.port, f"{client_id}-pub")
    pub.connect()
    for i in range(3):
        pub.publish(topic, f"missed {i}".encode())
    pub.close()  # all three acked by the broker, which queues them for the device
    back = PahoLink(mosquitto.host, mosquitto.port, f"{client_id}-dev")
    links.append(back)
    back.connect()  # no subscribe: the session remembers it
    assert [m.payload for m in receive(back, 3)] == [b"missed 0", b"missed 1", b"missed 2"]


@THREADS
def test_reconnects_and_resubscribes_after_broker_restart(
    own_mosquitto: MosquittoServer,
    links: list[PahoLink],
    prefix: str,
    client_id: str,
    network_thread: bool,
) -> None:
    topic = f"{prefix}/f/global"
    # A clean session forgets its subscriptions, so only on_connect can bring them back.
    sub = PahoLink(
        own_mosquitto.host,
        own_mosquitto.port,
        f"{client_id}-sub",
        clean_session=True,
        network_thread=network_thread,
    )
    links.append(sub)
    sub.connect()
    sub.subscribe(topic)
    own_mosquitto.restart()
    deadline = time.monotonic() + 15
    pub = PahoLink(own_mosquitto.host, own_mosquitto.port, f"{client_id}-pub")
    links.append(pub)
    pub.connect()
    while time.monotonic() < deadline:
        pub.publish(topic, b"after restart")
        if (message := sub.get(timeout=0.5)) is not None:
            assert message.payload == b"after restart"
            break
    else:
        pytest.fail("subscriber did not get messages after the broker restarted")
    assert sub.connected


@THREADS
def test_a_qos1_publish_into_a_lost_connection_goes_out_after_the_reconnect(
    own_mosquitto: MosquittoServer,
    links: list[PahoLink],
    prefix: str,
    client_id: str,
    network_thread: bool,
) -> None:
    topic = f"{prefix}/f/global"
    pub = PahoLink(
        own_mosquitto.host, own_mosquitto.port, f"{client_id}-pub", network_thread=network_thread
    )
    links.append(pub)
    pub.connect()
    own_mosquitto.restart()  # the connection drops under the link
    for i in range(20):  # the first writes find the socket gone: kept, not an error
        pub.publish(topic, f"v{i}".encode(), retain=True)
        time.sleep(0.01)
    deadline = time.monotonic() + 15
    while not pub.connected and time.monotonic() < deadline:
        pub.get(timeout=0.2)  # a driven link reconnects from its owner's calls
    assert pub.connected
    late = PahoLink(own_mosquitto.host, own_mosquitto.port, f"{client_id}-late", clean_session=True)
    links.append(late)
    late.connect()
    late.subscribe(topic)
    while time.monotonic() < deadline:
        pub.get(timeout=0.1)
        message = late.get(timeout=0.1)
        if message is not None and message.payload == b"v19":
            break
    else:
        pytest.fail("the messages published while the connection was lost never arrived")


@THREADS
def test_connect_failure_is_a_link_error(client_id: str, network_thread: bool) -> None:
    port = free_port()
    link = PahoLink("127.0.0.1", port, client_id, network_thread=network_thread)
    started = time.monotonic()
    with pytest.raises(LinkError, match=rf"127\.0\.0\.1:{port}, client {client_id}"):
        link.connect(timeout=1.0)
    assert time.monotonic() - started < 5
    assert not link.connected
    with pytest.raises(LinkError):
        link.publish("t", b"x")


def test_a_driven_link_connects_from_get_when_its_broker_comes(prefix: str, client_id: str) -> None:
    broker = MosquittoServer()  # its port is chosen, nothing listens there yet
    link = PahoLink(broker.host, broker.port, client_id, clean_session=True, network_thread=False)
    link.connect(timeout=0.3, keep_trying=True)  # returns; get() goes on trying
    link.subscribe(f"{prefix}/late")  # remembered: subscribed once connected
    assert not link.connected
    with broker:
        pub = make_link(broker.url, f"{client_id}-pub")
        pub.connect(timeout=5)
        deadline = time.monotonic() + 15
        got = None
        while got is None and time.monotonic() < deadline:
            pub.publish(f"{prefix}/late", b"hello")
            got = link.get(0.5)
        assert got is not None and got.payload == b"hello" and link.connected
        pub.close()
        link.close()
        assert not link.connected


@pytest.mark.parametrize("url", ["http://h:1", "mqtt://", "mqtt://h:notaport", "mqtt://h/x"])
def test_make_link_rejects_bad_urls(url: str) -> None:
    with pytest.raises(LinkError):
        make_link(url, "c")


@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_the_birth_message_follows_every_reconnect(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A dropped link leaves the Will ("offline", retained); the birth message replaces it."""
    from mosquitto import MosquittoServer

    with MosquittoServer(persistence=True, workdir=tmp_path) as broker:
        will = Message("fleet/status/dev", b"offline", retain=True)
        birth = Message("fleet/status/dev", b"online", retain=True)
        dev = make_link(broker.url, "dev", will, birth=birth)
        dev.connect(timeout=5)
        broker.restart()  # the broker drops every client; dev reconnects by itself
        deadline = time.monotonic() + 15
        while not dev.connected:
            assert time.monotonic() < deadline, "no reconnect"
            time.sleep(0.05)
        watcher = make_link(broker.url, "watcher")
        watcher.connect(timeout=5)
        watcher.subscribe("fleet/status/dev")
        msg = watcher.get(5.0)
        assert msg is not None and msg.payload == b"online" and msg.retain
        watcher.close()
        dev.close()


def test_nagle_is_off_on_the_broker_connection(
    mosquitto: MosquittoServer, links: list[PahoLink], client_id: str
) -> None:
    link = PahoLink(mosquitto.host, mosquitto.port, client_id, clean_session=True)
    links.append(link)
    link.connect()
    sock = link._client.socket()
    assert sock is not None
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_a_driven_link_flushes_what_its_owner_stopped_driving(
    own_mosquitto: MosquittoServer, links: list[PahoLink], prefix: str, client_id: str
) -> None:
    """A link without a thread writes only while driven: a publish larger than the socket
    takes at once stays partly in its buffer until ``flush`` (the aggregator's last model)."""
    topic = f"{prefix}/f/global"
    host, port = own_mosquitto.host, own_mosquitto.port
    pub = PahoLink(host, port, f"{client_id}-pub", network_thread=False)
    links.append(pub)
    pub.connect()
    payload = bytes(range(256)) * (32 * 1024)  # 8 MiB
    with own_mosquitto.paused():  # a broker that reads nothing: the socket fills up
        pub.publish(topic, payload, retain=True)
        assert pub._client.want_write()  # part of it waits in paho's buffer
    assert pub.flush(30.0)
    late = PahoLink(host, port, f"{client_id}-late", clean_session=True)
    links.append(late)
    late.connect()
    late.subscribe(topic)
    got = late.get(timeout=10)
    assert got is not None and got.payload == payload


@THREADS
def test_an_ended_subscription_is_not_renewed_after_a_reconnect(
    own_mosquitto: MosquittoServer,
    links: list[PahoLink],
    prefix: str,
    client_id: str,
    network_thread: bool,
) -> None:
    kept, ended = f"{prefix}/f/inbox/d1", f"{prefix}/f/secagg"
    sub = PahoLink(
        own_mosquitto.host,
        own_mosquitto.port,
        f"{client_id}-sub",
        clean_session=True,
        network_thread=network_thread,
    )
    pub = PahoLink(own_mosquitto.host, own_mosquitto.port, f"{client_id}-pub")
    links += [sub, pub]
    sub.connect()
    pub.connect()
    sub.subscribe(kept)
    sub.subscribe(ended)
    sub.unsubscribe(ended)  # returns once the broker has acked
    sub.unsubscribe(ended)  # a second time: nothing to do
    pub.publish(ended, b"not for sub")
    pub.publish(kept, b"before")
    assert [m.payload for m in receive(sub, 1)] == [b"before"]
    own_mosquitto.restart()  # a clean session: on_connect renews what is still subscribed
    deadline = time.monotonic() + 15
    got: list[bytes] = []
    while time.monotonic() < deadline and b"after" not in got:
        pub.publish(ended, b"not for sub")
        pub.publish(kept, b"after")
        if (message := sub.get(timeout=0.5)) is not None:
            got.append(message.payload)
    assert b"after" in got and b"not for sub" not in got


def test_an_unsubscribe_ends_what_a_persistent_session_kept_online_or_not(
    mosquitto: MosquittoServer, links: list[PahoLink], prefix: str, client_id: str
) -> None:
    """A device that listened to a topic in an earlier run keeps that subscription in its
    session; this link never subscribed to it, and still ends it: at once when connected,
    on the next connect when not."""
    topic, marker = f"{prefix}/f/round", f"{prefix}/f/inbox/d1"
    pub = PahoLink(mosquitto.host, mosquitto.port, f"{client_id}-pub")
    links.append(pub)
    pub.connect()
    for device, online in ((f"{client_id}-a", True), (f"{client_id}-b", False)):
        earlier = PahoLink(mosquitto.host, mosquitto.port, device)
        earlier.connect()
        earlier.subscribe(topic)
        earlier.close()
        now = PahoLink(mosquitto.host, mosquitto.port, device)
        links.append(now)
        if online:
            now.connect()
            pub.publish(topic, b"kept by the session")
            assert [m.payload for m in receive(now, 1)] == [b"kept by the session"]
            now.unsubscribe(topic)  # returns once the broker has acked
        else:
            now.unsubscribe(topic)  # offline: goes out when it connects
            now.connect()
        now.subscribe(marker)  # acked after what the connection sent before it
        pub.publish(topic, b"not for a quiet device")
        pub.publish(marker, b"marker")
        assert [m.payload for m in receive(now, 1)] == [b"marker"]
        assert now.get(timeout=0.3) is None


def thread_switches(native_id: int) -> int:
    """Voluntary context switches of one thread of this process so far: its waits, each
    ended by a wake-up (preemptions, which follow the machine's load, left out)."""
    with open(f"/proc/self/task/{native_id}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc")


@pytest.mark.slow
def test_an_idle_link_network_thread_sleeps_a_quarter_keepalive_and_keeps_alive(
    mosquitto: MosquittoServer, links: list[PahoLink], prefix: str, client_id: str
) -> None:
    """paho's own network loop wakes every second; an idle link's waits a quarter of the
    keepalive (7.5 s at the default 30; 3 s here, of 12), sends its PINGREQs in time all the
    same (Mosquitto 2.0 drops a client silent for 2 keepalives: a wait of more than 24 s
    here would lose the link), and a message still ends the wait at once."""
    will = Message(f"{prefix}/will", b"gone")  # the broker sends it if it drops the link
    link = PahoLink(
        mosquitto.host, mosquitto.port, client_id, clean_session=True, keepalive=12, will=will
    )
    watcher = PahoLink(mosquitto.host, mosquitto.port, f"{client_id}-w", clean_session=True)
    links += [link, watcher]
    watcher.connect()
    watcher.subscribe(will.topic)
    link.connect()
    link.subscribe(f"{prefix}/ping")
    thread = link._client._thread
    assert thread is not None and thread.native_id is not None
    before, start = thread_switches(thread.native_id), time.monotonic()
    time.sleep(9.1)  # 3 waits of 3 s; paho's loop would wake 9 times
    woke, took = thread_switches(thread.native_id) - before, time.monotonic() - start
    assert woke <= took / 1.5, f"{woke} wake-ups of the network thread in {took:.1f} s"
    time.sleep(16)  # 25 s in all: past 2 keepalives with nothing sent but PINGREQs
    assert link.connected and watcher.get(timeout=0.5) is None  # never dropped: no Will
    sent = time.monotonic()
    watcher.publish(f"{prefix}/ping", b"x")
    msg = link.get(timeout=5)
    assert msg is not None and msg.payload == b"x"
    assert time.monotonic() - sent < 1.0


def test_loop_timeout_follows_the_keepalive() -> None:
    from fedge.protocol.paho_link import LOOP_TIMEOUT_MAX, loop_timeout

    assert loop_timeout(60) == 15.0 and loop_timeout(30) == 7.5 and loop_timeout(2) == 1.0
    assert loop_timeout(0) == LOOP_TIMEOUT_MAX and loop_timeout(3600) == LOOP_TIMEOUT_MAX


@THREADS
def test_wake_ends_a_waiting_get(
    mosquitto: MosquittoServer, links: list[PahoLink], client_id: str, network_thread: bool
) -> None:
    import threading

    link = PahoLink(
        mosquitto.host, mosquitto.port, client_id, clean_session=True, network_thread=network_thread
    )
    links.append(link)
    link.connect()
    threading.Timer(0.3, link.wake).start()
    start = time.monotonic()
    assert link.get(timeout=30) is None
    assert time.monotonic() - start < 2.0  # a driven link looks at its inbox every second


def until(done: Callable[[], bool], timeout: float = 15.0, link: PahoLink | None = None) -> bool:
    """Wait for ``done()``; ``link``: a driven one, run meanwhile (it connects from ``get``)."""
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        if link is None:
            time.sleep(0.05)
        else:
            link.get(0.05)
    return done()


def saved(broker: MosquittoServer) -> None:
    """A broker with persistence writes its database now (SIGUSR1), as its autosave does."""

    def saves() -> int:
        return broker.log_path.read_text(errors="replace").count("Saving in-memory database")

    before = saves()
    assert broker._process is not None
    broker._process.send_signal(signal.SIGUSR1)
    assert until(lambda: saves() > before, 10), broker.log_tail()


def crash(broker: MosquittoServer) -> None:
    """The broker dies (nothing saved on the way out) and starts again from its last save."""
    assert broker._process is not None
    broker._process.kill()
    broker.stop()
    broker.start()


@THREADS
@pytest.mark.parametrize("ending", ["dropped", "broker restart", "broker restart, no persistence"])
def test_a_reconnect_subscribes_again_only_where_the_broker_lost_the_session(
    tmp_path: Path,
    links: list[PahoLink],
    prefix: str,
    client_id: str,
    network_thread: bool,
    ending: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each SUBSCRIBE makes the broker send its retained messages again (the whole global
    model). A session the broker kept holds the subscriptions, and what was published while
    the device was away comes from its queue; a session it lost is subscribed again, and the
    retained messages come that way. Either way the device gets the new round once, and the
    model it has already not again."""
    monkeypatch.setattr(paho_link, "SESSION_SAVE_MARGIN", 0.0)  # every grant is on disc
    model, ann, marker = f"{prefix}/f/global", f"{prefix}/f/round", f"{prefix}/f/marker"
    persistence = ending != "broker restart, no persistence"
    with MosquittoServer(persistence=persistence, workdir=tmp_path) as broker:
        agg = PahoLink(broker.host, broker.port, f"{client_id}-agg")
        dev = PahoLink(broker.host, broker.port, f"{client_id}-dev", network_thread=network_thread)
        links += [agg, dev]
        agg.connect()
        agg.publish(model, b"v1", retain=True)
        dev.connect()
        dev.subscribe(model)
        dev.subscribe(ann)
        assert [m.payload for m in receive(dev, 1)] == [b"v1"]
        if ending == "dropped":  # the broker stays; the device's network goes
            sock = dev._client.socket()
            assert sock is not None
            sock.shutdown(socket.SHUT_RDWR)
        else:
            broker.restart()
        agg.publish(ann, b"round 2", retain=True)  # while the device is away, or just back
        got = [m.payload for m in receive(dev, 1, timeout=15)]  # the first thing once back
        dev.subscribe(marker)  # acked after what the connection sent before it
        agg.publish(marker, b"marker")
        while (msg := dev.get(5)) is not None and msg.payload != b"marker":
            got.append(msg.payload)
        # (Without persistence the broker lost the retained model too.)
        assert msg is not None and got == [b"round 2"], got


def test_a_subscription_a_crashed_broker_had_not_saved_is_renewed(
    tmp_path: Path, links: list[PahoLink], prefix: str, client_id: str
) -> None:
    """Mosquitto saves its sessions now and then (production.conf: every 300 s); after a
    crash it comes back with the last save and says the session is present, without what it
    granted since. Filters granted shortly before the connection was lost are renewed."""
    old, new = f"{prefix}/f/global", f"{prefix}/f/secagg"
    with MosquittoServer(persistence=True, workdir=tmp_path) as broker:
        dev = PahoLink(broker.host, broker.port, f"{client_id}-dev")
        pub = PahoLink(broker.host, broker.port, f"{client_id}-pub", clean_session=True)
        links += [dev, pub]
        dev.connect()
        dev.subscribe(old)
        saved(broker)
        dev.subscribe(new)  # not on disc when the broker dies
        crash(broker)
        pub.connect()
        got = None
        deadline = time.monotonic() + 15
        while got is None and time.monotonic() < deadline:
            pub.publish(new, b"shares")
            got = dev.get(0.5)
        assert got is not None and got.payload == b"shares", broker.log_tail()


def test_an_unsubscribe_lost_with_the_connection_is_sent_again(
    tmp_path: Path,
    links: list[PahoLink],
    prefix: str,
    client_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The UNSUBSCRIBE went into the socket and the broker died before it read it: its
    session, back from disc, still holds the subscription; the link sends it again."""
    monkeypatch.setattr(paho_link, "SUBACK_TIMEOUT", 0.5)
    topic, marker = f"{prefix}/f/round", f"{prefix}/f/inbox/d1"
    with MosquittoServer(persistence=True, workdir=tmp_path) as broker:
        dev = PahoLink(broker.host, broker.port, f"{client_id}-dev")
        pub = PahoLink(broker.host, broker.port, f"{client_id}-pub", clean_session=True)
        links += [dev, pub]
        dev.connect()
        dev.subscribe(topic)
        saved(broker)
        with broker.paused():  # reads nothing: no ack comes
            dev.unsubscribe(topic)
            crash(broker)
        assert until(lambda: dev.connected)
        dev.subscribe(marker)  # acked after what the connection sent before it
        pub.connect()
        pub.publish(topic, b"not for a quiet device")
        pub.publish(marker, b"marker")
        assert [m.payload for m in receive(dev, 1)] == [b"marker"]
        assert dev.get(timeout=0.3) is None


@THREADS
def test_the_birth_publish_is_waited_for_and_its_ack_answers_nothing_later(
    own_mosquitto: MosquittoServer,
    links: list[PahoLink],
    prefix: str,
    client_id: str,
    network_thread: bool,
) -> None:
    """The birth message goes out on each reconnect; its ack must not count for a later
    publish that gets the same message id (paho's ids wrap after 65,535)."""
    birth = Message(f"{prefix}/f/status/d1", b"online", retain=True)
    dev = PahoLink(
        own_mosquitto.host,
        own_mosquitto.port,
        client_id,
        birth=birth,
        network_thread=network_thread,
    )
    links.append(dev)
    dev.connect()
    for _ in range(2):
        before = dev._client._last_mid
        own_mosquitto.restart()
        # Back, with a birth (a new message id), and the broker has acked it.
        assert until(lambda b=before: dev._client._last_mid > b and dev.flush(0.5), link=dev)
    with own_mosquitto.paused():  # the broker has not got what follows
        dev._client._last_mid = before  # the next publish gets the last birth's id
        dev.publish(f"{prefix}/f/update/d1", b"the update")
        assert not dev.flush(0.5)


@THREADS
@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe"])
def test_a_late_ack_answers_no_later_request(
    own_mosquitto: MosquittoServer,
    links: list[PahoLink],
    prefix: str,
    client_id: str,
    network_thread: bool,
    kind: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An ack that comes after its request stopped waiting is settled, not kept for a later
    request that gets the same message id."""
    monkeypatch.setattr(paho_link, "SUBACK_TIMEOUT", 0.5)
    link = PahoLink(
        own_mosquitto.host,
        own_mosquitto.port,
        client_id,
        clean_session=True,
        network_thread=network_thread,
    )
    links.append(link)
    link.connect()
    request = link.subscribe if kind == "subscribe" else link.unsubscribe
    with own_mosquitto.paused():
        first = link._client._last_mid
        request(f"{prefix}/a")  # no ack in time
    link.subscribe(f"{prefix}/b")  # acked after the late one
    with own_mosquitto.paused(), caplog.at_level(logging.WARNING, logger="fedge.protocol"):
        caplog.clear()
        link._client._last_mid = first  # the next request gets the late one's id
        request(f"{prefix}/c")
        assert "no ack for" in caplog.text  # it waited for an ack of its own


def test_the_production_broker_saves_its_sessions_within_the_clients_margin() -> None:
    """A client renews on reconnect only what it subscribed to within SESSION_SAVE_MARGIN
    before the loss: the broker must save its sessions more often than that."""
    import re
    from pathlib import Path

    from fedge.protocol.paho_link import SESSION_SAVE_MARGIN

    conf = Path(__file__).resolve().parents[2] / "broker_config" / "production.conf"
    found = re.search(r"^autosave_interval (\d+)$", conf.read_text(), re.MULTILINE)
    assert found is not None and 0 < int(found[1]) < SESSION_SAVE_MARGIN


def wait_until(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.slow
def test_refused_reconnects_do_not_hide_a_filter_the_restored_session_lacks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A filter granted shortly before a broker crash is renewed when the broker comes back
    from an older save, even after attempts it refused meanwhile (they lost nothing: the
    loss is when the accepted connection went)."""
    import fedge.protocol.paho_link as paho_link
    from fake_mqtt import FakeBroker

    monkeypatch.setattr(paho_link, "SESSION_SAVE_MARGIN", 1.0)
    broker = FakeBroker()
    link = PahoLink("127.0.0.1", broker.port, "dev-margin", keepalive=1)
    try:
        link.connect(timeout=5)
        link.subscribe("f/inbox/dev")
        time.sleep(0.5)
        broker.mode = "refuse"
        broker.drop()  # a crash; attempts at +1 s and +3 s are refused
        assert wait_until(lambda: broker.seen("CONNECT").count(("refuse",)) >= 2)
        broker.mode = "present"  # back from a save that lacks the subscription
        assert wait_until(lambda: ("present",) in broker.seen("CONNECT"))
        assert wait_until(lambda: len(broker.seen("SUBSCRIBE")) >= 2, 3.0)
        assert broker.seen("SUBSCRIBE")[-1] == ("f/inbox/dev",)
    finally:
        link.close()
        broker.close()


def test_an_ended_subscription_is_ended_again_on_each_reconnect() -> None:
    """A broker that crashed comes back from its last save, which may hold a subscription
    ended (and acknowledged) since: each connect ends it again."""
    from fake_mqtt import FakeBroker

    broker = FakeBroker()
    link = PahoLink("127.0.0.1", broker.port, "dev-ended")
    try:
        link.connect(timeout=5)
        link.subscribe("f/inbox/dev")
        link.subscribe("f/round")
        link.unsubscribe("f/round")  # acknowledged at once
        assert broker.seen("UNSUBSCRIBE") == [("f/round",)]
        broker.mode = "present"
        broker.drop()
        assert wait_until(lambda: len(broker.seen("UNSUBSCRIBE")) >= 2)
        assert broker.seen("UNSUBSCRIBE")[-1] == ("f/round",)
        link.subscribe("f/round")  # subscribed again: no longer ended on a reconnect
        broker.drop()
        assert wait_until(lambda: broker.seen("CONNECT").count(("present",)) >= 2)
        time.sleep(0.5)
        assert len(broker.seen("UNSUBSCRIBE")) == 2
    finally:
        link.close()
        broker.close()

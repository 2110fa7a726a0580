from __future__ import annotations

import threading

import pytest
from fedge.protocol import InvalidId, Link, LinkError, MemoryBroker, MemoryLink, Message

pytestmark = pytest.mark.link


def connected(broker: MemoryBroker, client_id: str, will: Message | None = None) -> MemoryLink:
    link = MemoryLink(broker, client_id, will=will)
    link.connect()
    return link


def drain(link: Link) -> list[Message]:
    out = []
    while (message := link.get(timeout=0)) is not None:
        out.append(message)
    return out


def test_routes_by_filter_with_wildcards() -> None:
    broker = MemoryBroker()
    agg, one, everything, sender = (connected(broker, n) for n in ("agg", "one", "all", "s"))
    agg.subscribe("p/f/update/+")
    one.subscribe("p/f/update/d1")
    everything.subscribe("p/#")
    sender.publish("p/f/update/d1", b"u1")
    sender.publish("p/f/update/d2", b"u2")
    sender.publish("p/f/status/d1", b"s1")
    sender.publish("q/x", b"q")
    assert [m.payload for m in drain(agg)] == [b"u1", b"u2"]
    assert drain(one) == [Message("p/f/update/d1", b"u1")]
    assert [m.topic for m in drain(everything)] == [
        "p/f/update/d1",
        "p/f/update/d2",
        "p/f/status/d1",
    ]
    assert drain(sender) == []


def test_overlapping_filters_deliver_once() -> None:
    broker = MemoryBroker()
    link = connected(broker, "a")
    link.subscribe("p/#")
    link.subscribe("p/+")
    link.publish("p/x", b"1")
    assert len(drain(link)) == 1


def test_retained_delivered_on_subscribe_and_cleared_by_empty_payload() -> None:
    broker = MemoryBroker()
    agg = connected(broker, "agg")
    agg.publish("p/f/round", b"round-1", retain=True)
    agg.publish("p/f/round", b"round-2", retain=True)  # replaces round-1
    early = connected(broker, "early")
    early.subscribe("p/f/round")
    assert drain(early) == [Message("p/f/round", b"round-2", retain=True)]
    agg.publish("p/f/round", b"round-3", retain=True)
    assert drain(early) == [Message("p/f/round", b"round-3", retain=False)]  # live: no flag
    agg.publish("p/f/round", b"", retain=True)  # clears, and is delivered like any message
    assert drain(early) == [Message("p/f/round", b"", retain=False)]
    late = connected(broker, "late")
    late.subscribe("p/#")
    assert drain(late) == []


def test_will_on_kill_but_not_on_close() -> None:
    broker = MemoryBroker()
    watcher = connected(broker, "agg")
    watcher.subscribe("p/f/status/+")
    will = Message("p/f/status/d1", b"offline", retain=True)
    connected(broker, "d1", will=will).close()
    assert drain(watcher) == []
    device = connected(broker, "d1", will=will)
    device.kill()
    assert drain(watcher) == [Message("p/f/status/d1", b"offline")]
    assert not device.connected
    device.kill()  # already gone: nothing more
    assert drain(watcher) == []
    late = connected(broker, "late")
    late.subscribe("p/f/status/+")
    assert drain(late) == [Message("p/f/status/d1", b"offline", retain=True)]  # will was retained


def test_byte_counters_and_get_timeout() -> None:
    broker = MemoryBroker()
    a, b = connected(broker, "a"), connected(broker, "b")
    b.subscribe("t/+")
    a.publish("t/1", b"12345")
    packet = 1 + 1 + 2 + 3 + 2 + 5  # fixed header, remaining length, topic, packet id, payload
    assert a.bytes_up == packet and b.bytes_down == packet
    assert a.bytes_down == 4 and b.bytes_up == 4  # the PUBACKs
    assert b.get(timeout=1.0) == Message("t/1", b"12345")
    assert b.get(timeout=0.01) is None


def test_get_wakes_up_on_delivery_from_another_thread() -> None:
    broker = MemoryBroker()
    a, b = connected(broker, "a"), connected(broker, "b")
    b.subscribe("t")
    timer = threading.Timer(0.05, a.publish, args=("t", b"x"))
    timer.start()
    assert b.get(timeout=5.0) == Message("t", b"x")
    timer.join()


def test_errors() -> None:
    broker = MemoryBroker()
    link = MemoryLink(broker, "a")
    with pytest.raises(LinkError):
        link.publish("t", b"")  # not connected yet
    link.connect()
    with pytest.raises(InvalidId):
        link.subscribe("a/#/b")
    with pytest.raises(LinkError):
        link.publish("t/+", b"")
    with pytest.raises(LinkError):
        link.publish("t", b"", qos=3)
    link.close()
    with pytest.raises(LinkError):
        link.subscribe("t")


def test_same_client_id_takes_over() -> None:
    broker = MemoryBroker()
    first = connected(broker, "d1")
    first.subscribe("t")
    second = connected(broker, "d1")
    assert not first.connected and second.connected
    second.subscribe("t")
    second.publish("t", b"x")
    assert drain(first) == [] and drain(second) == [Message("t", b"x")]
    first.close()  # must not unregister the new connection
    second.publish("t", b"y")
    assert drain(second) == [Message("t", b"y")]


def test_a_shared_subscription_hands_each_message_to_one_member() -> None:
    broker = MemoryBroker()
    w1, w2, plain, sender = (connected(broker, n) for n in ("w1", "w2", "plain", "s"))
    sender.publish("p/f/update/d0", b"old", retain=True)
    for worker in (w1, w2):
        worker.subscribe("$share/g/p/f/update/+")
    plain.subscribe("p/f/update/+")
    for i in range(4):
        sender.publish(f"p/f/update/d{i}", b"u%d" % i)
    got1, got2 = [m.payload for m in drain(w1)], [m.payload for m in drain(w2)]
    assert sorted(got1 + got2) == [b"u0", b"u1", b"u2", b"u3"]  # once each, no retained copy
    assert len(got1) == len(got2) == 2
    assert len(drain(plain)) == 5  # an ordinary subscriber still gets every one (and retained)
    with pytest.raises(InvalidId):
        w1.subscribe("$share/g")

"""What one Mosquitto carries on this machine: the per-message costs behind the estimate for a
100,000-device fleet in docs/scale.md.

Three loads, each through a Mosquitto of the bench's own (the shipped ``dev.conf``), with
links on one PahoHub (the way ``fedge sim`` drives a thousand devices):

- fan-in: P publishers send QoS 1 messages of a status's or an update's size to one
  subscriber (the aggregator's side): messages/s and MB/s the subscriber receives;
- fan-out: one retained message of a global model's size published to S subscribers (every
  online device holds a subscription to ``global``): time until the last one has it.

    .venv/bin/python bench/broker_load.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fedge.fleet.mosquitto import LocalMosquitto
from fedge.protocol.paho_hub import PahoHub
from fedge.protocol.paho_link import PahoLink

WINDOW = 500  # messages in flight to the subscriber at a time


def connect_all(hub: PahoHub, broker: LocalMosquitto, names: list[str]) -> list[PahoLink]:
    links = [
        PahoLink(broker.host, broker.port, name, clean_session=True, hub=hub) for name in names
    ]
    for link in links:
        link.connect(timeout=60)
    return links


def fan_in(broker: LocalMosquitto, publishers: int, size: int, count: int) -> tuple[float, float]:
    """(messages/s, MB/s) one subscriber receives from ``publishers`` QoS 1 senders."""
    hub = PahoHub().start()
    try:
        sub = connect_all(hub, broker, ["sink"])[0]
        sub.subscribe("load/in/+", qos=1)
        pubs = connect_all(hub, broker, [f"p{i}" for i in range(publishers)])
        payload = b"x" * size
        started = time.perf_counter()
        got = 0
        # In windows of WINDOW: the broker queues at most max_queued_messages (1000 in the
        # shipped configs) for a subscriber that falls behind and drops the rest.
        for first in range(0, count, WINDOW):
            for i in range(first, min(count, first + WINDOW)):
                pubs[i % publishers].publish(f"load/in/{i % publishers}", payload, qos=1)
            while got < min(count, first + WINDOW):
                if sub.get(30) is None:
                    raise RuntimeError(f"fan-in: {got} of {count} messages arrived")
                got += 1
        took = time.perf_counter() - started
        for link in [sub, *pubs]:
            link.close()
    finally:
        hub.close()
    return count / took, count * size / took / 1e6


def fan_out(broker: LocalMosquitto, subscribers: int, size: int) -> float:
    """Seconds from publishing one retained message until all ``subscribers`` have it."""
    hub = PahoHub().start()
    try:
        subs = connect_all(hub, broker, [f"s{i}" for i in range(subscribers)])
        for link in subs:
            link.subscribe("load/global", qos=1)
        pub = connect_all(hub, broker, ["model"])[0]
        started = time.perf_counter()
        pub.publish("load/global", b"m" * size, qos=1, retain=True)
        for link in subs:
            if link.get(60) is None:
                raise RuntimeError("fan-out: a subscriber never got the model")
        took = time.perf_counter() - started
        pub.publish("load/global", b"", qos=1, retain=True)  # clear it for the next run
        for link in [pub, *subs]:
            link.close()
    finally:
        hub.close()
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="fedge-load-") as tmp,
        LocalMosquitto(Path(tmp)) as broker,
    ):
        print("fan-in to one subscriber, QoS 1 (median of runs)")
        print(f"{'payload':>10} {'publishers':>10} {'messages/s':>11} {'MB/s':>7}")
        for size, publishers, count in ((600, 100, 20_000), (4_200, 100, 10_000)):
            runs = [fan_in(broker, publishers, size, count) for _ in range(args.repeat)]
            rate = statistics.median(r[0] for r in runs)
            mbs = statistics.median(r[1] for r in runs)
            print(f"{size:>10} {publishers:>10} {rate:>11,.0f} {mbs:>7.1f}")
        print("fan-out of one retained message, QoS 1 (median of runs)")
        print(f"{'payload':>10} {'subscribers':>11} {'seconds':>8} {'MB/s out':>9}")
        for size, subscribers in ((200_000, 100), (200_000, 500), (20_000, 500)):
            took = statistics.median(fan_out(broker, subscribers, size) for _ in range(args.repeat))
            print(
                f"{size:>10} {subscribers:>11} {took:>8.2f} {subscribers * size / took / 1e6:>9.1f}"
            )


if __name__ == "__main__":
    main()

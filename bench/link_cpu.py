"""CPU per MQTT message of a PahoLink: with paho's network thread, and driven by its owner.

A publisher in a process of its own sends ``--messages`` QoS 1 messages of 300 bytes (a status's
size) to a subscriber made with ``manual_ack`` (as the aggregator's link is), which takes each
with ``get`` and acknowledges it with ``ack``; then the subscriber publishes as many itself and
closes (waiting for the broker's acks). The subscriber's CPU time (``getrusage``, all threads)
per message, for a link with paho's thread (``network_thread=True``, the agent's) and one
without (``network_thread=False``, the aggregator's), alternating, on a Mosquitto of the
bench's own.

    .venv/bin/python bench/link_cpu.py
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedge.fleet.mosquitto import LocalMosquitto
from fedge.protocol.paho_link import PahoLink

PUBLISHER = """
import sys
from fedge.protocol.paho_link import PahoLink
port, count, topic = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
link = PahoLink("127.0.0.1", port, topic.replace("/", "-") + "-pub", clean_session=True)
link.connect()
print("ready", flush=True)
sys.stdin.readline()
for i in range(count):
    link.publish(f"{topic}/d{i % 10}", b"x" * 300)
link.close()
"""


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one(port: int, count: int, network_thread: bool, tag: str) -> tuple[float, float]:
    """Microseconds of CPU per message received and acknowledged, and per message published."""
    topic = f"bench/{tag}"
    link = PahoLink(
        "127.0.0.1",
        port,
        f"sub-{tag}",
        clean_session=True,
        manual_ack=True,
        network_thread=network_thread,
    )
    link.connect()
    link.subscribe(f"{topic}/+")
    publisher = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, str(port), str(count), topic],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert publisher.stdin is not None and publisher.stdout is not None
    publisher.stdout.readline()  # connected
    start = cpu()
    publisher.stdin.write("go\n")
    publisher.stdin.flush()
    for _ in range(count):
        message = link.get(10.0)
        if message is None:
            raise SystemExit("messages stopped coming")
        link.ack(message)
    received = (cpu() - start) / count * 1e6
    publisher.wait()
    start = cpu()
    for _ in range(count):
        link.publish(f"{topic}-out", b"y" * 300)
    link.close()
    return received, (cpu() - start) / count * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    with (
        tempfile.TemporaryDirectory(prefix="fedge-link-") as tmp,
        LocalMosquitto(Path(tmp)) as broker,
    ):
        for i in range(args.repeats):
            for network_thread in (True, False):  # alternating
                tag = f"{i}-{'thread' if network_thread else 'driven'}-{time.time_ns()}"
                results[network_thread].append(one(broker.port, args.messages, network_thread, tag))
    print(f"{args.messages} messages of 300 bytes, QoS 1, {args.repeats} runs each (median)")
    print(f"{'link':<28} {'get + ack us/msg':>17} {'publish us/msg':>15}")
    for network_thread, label in (
        (True, "paho's network thread"),
        (False, "driven by get (no thread)"),
    ):
        got = results[network_thread]
        recv = statistics.median(r for r, _ in got)
        sent = statistics.median(p for _, p in got)
        print(f"{label:<28} {recv:>17.1f} {sent:>15.1f}")


if __name__ == "__main__":
    main()

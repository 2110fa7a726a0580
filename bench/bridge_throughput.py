"""Can the serial bridge keep up? Samples/s and CPU share of reader + decoder + store.

A child process plays an MCU: it writes 8-channel binary frames to a pseudo-terminal at the
target rate. This process runs what the agent runs while it is idle between rounds: the
agent's ``SensorSource`` with its defaults (the pyserial reader, the binary frame decoder,
the SQLite sample store, one transaction per batch of reads). It prints the rate it kept up
with, lost and faulty frames, the store transactions, and the CPU time it used as a share of
one core (process CPU time / wall time, from before the writer starts until the last batch
is stored; the writer is another process).

    .venv/bin/python bench/bridge_throughput.py --rate 5000 --seconds 10
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedge.agent.config import SerialConfig, TaskConfig
from fedge.agent.sensor_source import SensorSource
from fedge.agent.store import SampleStore

WRITER = r"""
import os, sys, time
from fedge.firmware_bridge.binary_frames import encode_frame
from fedge.firmware_bridge.sample import Sample
fd, rate, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
os.set_blocking(fd, True)
total = int(rate * seconds)
batch = max(1, int(rate / 200))  # write in 5 ms bursts, as a UART FIFO drains
start = time.monotonic()
sent = 0
while sent < total:
    chunk = b"".join(encode_frame(Sample(1, (sent + i) & 0xFFFF, (sent + i) & 0xFFFFFFFF,
                     tuple(float(c + i) for c in range(8)))) for i in range(batch))
    os.write(fd, chunk)
    sent += batch
    ahead = start + sent / rate - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
print(sent, flush=True)
"""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=5000.0, help="samples per second")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument(
        "--max-rows",
        type=int,
        default=1_000_000,
        help="the store's row bound (the agent's default is 200,000; below the samples sent, "
        "the run includes deleting the oldest)",
    )
    args = p.parse_args()
    master, slave = os.openpty()
    import tty

    tty.setraw(slave)
    port = os.ttyname(slave)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples.sqlite"
        serial = SerialConfig(port=port, baudrate=921600, max_rows=args.max_rows)
        source = SensorSource(serial, TaskConfig(), path)
        reader, decoder = source.reader, source.decoder
        source.start()
        reader.connected.wait(5)
        cpu0, wall0 = time.process_time(), time.monotonic()
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(master), str(args.rate), str(args.seconds)],
            pass_fds=(master,),
            stdout=subprocess.PIPE,
            text=True,
        )
        sent = int(writer.communicate()[0].strip())
        end = time.monotonic() + 5
        while reader.counters["samples"] < sent and time.monotonic() < end:
            time.sleep(0.01)
        source.stop()  # stores what the reader still holds
        wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
        with SampleStore(path) as store:
            stored = store.count()
    os.close(master)
    os.close(slave)
    got = reader.counters["samples"]
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"target {args.rate:,.0f} samples/s of 8 channels for {args.seconds:g} s: sent {sent:,}")
    print(
        f"decoded {got:,} ({got / wall:,.0f} samples/s over {wall:.2f} s), stored {stored:,}, "
        f"faults {dict(decoder.faults) or 0}, {reader.counters['batches']} store transactions"
    )
    print(
        f"CPU: {cpu:.2f} s in {wall:.2f} s = {100 * cpu / wall:.1f}% of one core "
        f"(reader, decoder and store; the writer is another process)"
    )
    # When a loaded machine slows the writer, the wall time stretches and the share above
    # shrinks; the CPU time per sample does not.
    per_sample = cpu / max(got, 1)
    print(
        f"CPU per sample: {1e6 * per_sample:.2f} us, {100 * per_sample * args.rate:.1f}% of one "
        f"core at {args.rate:,.0f} samples/s"
    )


if __name__ == "__main__":
    main()

"""Child of the batched-write crash test: serial port -> binary decoder -> store, in batches.

Usage: python serial_store_writer.py PORT DB_PATH FLUSH_SAMPLES. Prints the number of samples
in the store once the port is open and after every batch is committed, flushing each line, so
whoever kills it knows what was committed.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from typing import Any

from fedge.agent.store import SampleStore
from fedge.firmware_bridge.binary_frames import BinaryDecoder
from fedge.firmware_bridge.reader import SerialReader


def main() -> None:
    port, path, flush_samples = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = SampleStore(path)
    committed = store.count()

    def write(samples: Sequence[Any]) -> None:
        nonlocal committed
        committed += store.append(samples)
        print(committed, flush=True)

    reader = SerialReader(
        port,
        115200,
        BinaryDecoder(),
        on_samples=write,
        read_size=4096,
        flush_every=3600.0,  # only the size bound: the test knows how much may be held
        flush_samples=flush_samples,
    )
    stop = threading.Event()
    threading.Thread(target=reader.run, args=(stop,), daemon=True).start()
    reader.connected.wait(10)
    print(committed, flush=True)
    stop.wait()


if __name__ == "__main__":
    main()

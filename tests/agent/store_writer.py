"""Writer for the store's crash test: appends batches forever, printing the committed count.

Usage: python store_writer.py DB_PATH BATCH_SIZE. After every commit it prints the number of
samples in the store and flushes, so whoever kills it knows what was committed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
from fedge.agent.store import SampleStore


@dataclass(frozen=True)
class Sample:
    sensor_id: int
    seq: int | None
    timestamp_ms: int | None
    values: np.ndarray
    label: int | None


def main() -> None:
    path, batch = sys.argv[1], int(sys.argv[2])
    store = SampleStore(path)
    committed = store.count()
    print(committed, flush=True)
    rng = np.random.default_rng(committed)
    seq = committed
    while True:
        values = rng.random((batch, 6), dtype=np.float32)
        samples = [Sample(1, seq + i, None, values[i], None) for i in range(batch)]
        committed += store.append(samples)
        seq += batch
        print(committed, flush=True)


if __name__ == "__main__":
    main()

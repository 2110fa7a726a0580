"""The aggregator's cost per update and its memory against the number of devices in a round.

One round of N synthetic updates of the 50k-parameter model (float32, as `--codec float32`
sends them, the largest form an update takes) goes through a real aggregator: the in-memory
link, decode, validation, the state store (SQLite on disk, as in the field), the fold into the
round, and the close. Side by side for the plain mean (a running sum: O(model)) and the
coordinate-wise median (every delta kept to the end: O(devices x model)).

Memory is the peak of Python allocations while the round runs (``tracemalloc``, numpy's
arrays included), above what the aggregator held before the round; time per update is the
aggregator handling one update message (median), and the close is the time to average and
publish.

    .venv/bin/python bench/aggregation.py                 # N = 10, 100, 300, 1000
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from fedge.aggregator.config import AggregatorConfig
from fedge.aggregator.coordinator import Aggregator
from fedge.aggregator.store import Store
from fedge.aggregator.strategies.config import StrategyConfig
from fedge.models.runtime import load_runtime
from fedge.protocol import MemoryBroker, MemoryLink, Status, Topics, TrainingConfig, UpdateHeader
from fedge.protocol import encode as encode_msg
from fedge.protocol.status import encode_status

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "artifacts" / "digits_mlp_50k.tflite"
FLEET = "bench"


def one_round(devices: int, robust: str, work: Path) -> dict[str, float]:
    topics = Topics(FLEET)
    broker = MemoryBroker()
    weights = load_runtime(MODEL, prefer=("numpy",)).get_weights()
    cfg = AggregatorConfig(
        fleet=FLEET,
        model=MODEL,
        state_dir=work,
        min_devices=devices,
        quorum=1.0,
        round_timeout=3600,
        training=TrainingConfig(codec="float32"),
        strategy=StrategyConfig(name="fedavg", robust=robust),  # type: ignore[arg-type]
    )
    store = Store(work / "aggregator.sqlite")
    agg = Aggregator(
        cfg, link=MemoryLink(broker, "aggregator"), store=store, initial_weights=weights
    )
    agg.start()
    rng = np.random.default_rng(0)
    ids = [f"d{i:05d}" for i in range(devices)]
    senders = []
    for device in ids:
        link = MemoryLink(broker, device)
        link.connect()
        status = Status(device_id=device, state="online", timestamp=0.0)
        link.publish(topics.status(device), encode_status(status), retain=True)
        senders.append(link)
    while (msg := agg.link.get(0)) is not None:
        agg.handle(msg)
    agg.tick()  # the round is announced to every device
    assert agg.current is not None and len(agg.current.selected) == devices
    # Payloads made before measuring: the devices' side is not the aggregator's cost.
    payloads = []
    for device in ids:
        delta = {k: rng.normal(0, 1e-3, w.shape).astype(np.float32) for k, w in weights.items()}
        header = UpdateHeader(
            device_id=device,
            round_id=1,
            update_id=f"{device}-1",
            base_version=0,
            num_samples=int(rng.integers(50, 150)),
        )
        payloads.append(encode_msg(header, delta))
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    per_update = []
    for link, device, payload in zip(senders, ids, payloads, strict=True):
        link.publish(topics.update(device), payload)
        msg = agg.link.get(0)
        assert msg is not None
        started = time.perf_counter()
        agg.handle(msg)
        per_update.append(time.perf_counter() - started)
    del payloads, payload
    started = time.perf_counter()
    agg.tick()  # everyone answered: the round closes
    close = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert agg.version == 1, "the round did not close"
    store.close()
    return {
        "update_ms": 1000 * statistics.median(per_update),
        "close_ms": 1000 * close,
        "peak_mb": peak / 1e6,
    }


def main() -> None:
    logging.getLogger("fedge").setLevel(logging.ERROR)  # "no signing_key" once per round
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[10, 100, 300, 1000])
    args = ap.parse_args()
    print(f"one round of the 50k model (float32 updates, {MODEL.name})")
    print(f"{'devices':>7} {'combine':<7} {'per update ms':>13} {'close ms':>9} {'peak MB':>8}")
    for n in args.devices:
        for robust in ("mean", "median"):
            with tempfile.TemporaryDirectory(prefix="fedge-agg-") as tmp:
                r = one_round(n, robust, Path(tmp))
            print(
                f"{n:>7} {robust:<7} {r['update_ms']:>13.2f} {r['close_ms']:>9.1f}"
                f" {r['peak_mb']:>8.1f}"
            )


if __name__ == "__main__":
    main()

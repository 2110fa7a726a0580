"""Updates that come in chunks: kept through a crash, counted once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fedge.aggregator import coordinator
from fedge.aggregator.coordinator import Aggregator
from fedge.protocol import MemoryBroker, UpdateHeader, encode, split
from fedge.protocol.wire import publish_size
from test_coordinator import (  # noqa: F401
    STORES,
    Clock,
    Device,
    T,
    close_stores,
    delta,
    make,
    pump,
)

pytestmark = pytest.mark.link


class Killed(BaseException):
    """The process dies here: nothing after it runs, no handler catches it."""


def chunks(device: str, update_id: str, value: float = 0.5) -> list[bytes]:
    header = UpdateHeader(
        device_id=device, round_id=1, update_id=update_id, base_version=0, num_samples=10
    )
    parts = split(encode(header, delta(value)), 80, bytes.fromhex(update_id))
    assert len(parts) >= 3
    return parts


def wire(parts: list[bytes]) -> int:
    return sum(publish_size(T.update("a"), len(p), 1) for p in parts)


def stored(agg: Aggregator, table: str) -> int:
    return int(agg.store.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


@pytest.mark.parametrize("dies_in", ["decode", "fold"])
def test_an_update_whose_last_chunk_was_in_hand_at_a_crash_counts_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dies_in: str
) -> None:
    """Killed after the last chunk made the update whole but before it was kept ("decode"),
    or after it was kept ("fold"): the broker sends the last chunk again (it was not
    acknowledged), never the others (they were), and the update counts once."""
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=2)
    a, b = Device(broker, "a"), Device(broker, "b")
    pump(agg)
    b.send(1, delta(0.0), 30)
    parts = chunks("a", "aabbccddeeff0011")
    for part in parts[:-1]:
        a.link.publish(T.update("a"), part)
    pump(agg)  # kept and acknowledged

    def die(*args: object, **kwargs: object) -> None:
        raise Killed

    assert agg.current is not None
    if dies_in == "decode":
        monkeypatch.setattr(coordinator.intake, "decode", die)
    else:
        monkeypatch.setattr(agg.current.acc, "add", die)
    a.link.publish(T.update("a"), parts[-1])
    with pytest.raises(Killed):
        pump(agg)
    monkeypatch.undo()
    agg.store.db.close()
    agg = make(tmp_path, broker, clock, min_devices=2)
    a.link.publish(T.update("a"), parts[-1])  # the redelivery
    pump(agg)
    assert agg.version == 1
    np.testing.assert_allclose(agg.weights["w"], 0.5 * 10 / 40)
    line = json.loads((tmp_path / "rounds.jsonl").read_text())
    assert line["weights"] == {"a": 10, "b": 30}
    # Kept in the same commit as the update, its chunks are gone ("fold": the redelivered
    # last chunk alone waits in vain, and goes at the chunk timeout).
    clock.now += 61
    pump(agg)
    assert stored(agg, "chunks") == 0

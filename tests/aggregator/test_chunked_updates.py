"""Updates that come in chunks: kept through a crash, counted once, forgotten when refused."""

from __future__ import annotations

import json
import struct
import zlib
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


def test_a_redelivered_chunk_counts_with_its_update(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=1, rounds=1)
    a = Device(broker, "a")
    pump(agg)
    parts = chunks("a", "aabbccddeeff0011")
    sent = [parts[0], parts[0], *parts[1:]]  # the first one twice (QoS 1 redelivery)
    for part in sent:
        a.link.publish(T.update("a"), part)
    pump(agg)
    assert agg.done and agg.rejected["chunk_duplicate"] == 1
    line = json.loads((tmp_path / "rounds.jsonl").read_text())
    assert line["bytes_up_by_device"] == {"a": wire(sent)}  # every byte, once
    assert agg.stray_bytes == 0


def test_a_refused_chunk_leaves_its_update_and_its_count_alone(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=1, rounds=1)
    a = Device(broker, "a")
    pump(agg)
    parts = chunks("a", "aabbccddeeff0011")
    changed = split(
        encode(
            UpdateHeader(
                device_id="a",
                round_id=1,
                update_id="aabbccddeeff0011",
                base_version=0,
                num_samples=10,
            ),
            delta(0.25),
        ),
        80,
        bytes.fromhex("aabbccddeeff0011"),
    )[0]  # the same message id and index, other bytes: refused
    a.link.publish(T.update("a"), parts[0])
    a.link.publish(T.update("a"), changed)
    for part in parts[1:]:
        a.link.publish(T.update("a"), part)
    pump(agg)
    assert agg.done and agg.rejected["chunk_inconsistent"] == 1
    np.testing.assert_allclose(agg.weights["w"], 0.5)
    line = json.loads((tmp_path / "rounds.jsonl").read_text())
    assert line["bytes_up_by_device"] == {"a": wire(parts)}
    assert agg.stray_bytes == wire([changed])


def test_the_chunks_of_an_update_that_fails_its_checksum_are_forgotten(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=1)
    a = Device(broker, "a")
    pump(agg)
    parts = chunks("a", "1111111111111111")
    # A last chunk sound on its own (its own checksum holds) with other data: the whole
    # payload's checksum fails.
    data = bytearray(parts[-1][28:])
    data[0] ^= 0xFF
    head = parts[-1][:24]
    bad = head + struct.pack(">I", zlib.crc32(bytes(data), zlib.crc32(head))) + bytes(data)
    for part in [*parts[:-1], bad]:
        a.link.publish(T.update("a"), part)
    pump(agg)
    assert agg.rejected["chunk_bad_checksum"] == 1
    assert stored(agg, "chunks") == 0  # not left to grow the state until a restart
    assert agg.stray_bytes == wire([*parts[:-1], bad])
    assert agg.current is not None and agg.current.wire_up["a"] == 0

"""The device's sample store: bounds, retention, purge that really deletes, windows, crashes."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fedge.agent.store import SampleStore, StoreError

pytestmark = pytest.mark.unit

WRITER = Path(__file__).with_name("store_writer.py")
# Four float32s that do not occur by chance: their 16 bytes are searched for in the raw files.
SECRET = np.array([1234.5677, -9876.543, 3.1415e-7, 271828.19], np.float32)


@dataclass(frozen=True)
class Sample:  # the fields of fedge.firmware_bridge.sample.Sample
    sensor_id: int
    seq: int | None
    timestamp_ms: int | None  # the MCU's millis(); the store stamps its own receive time
    values: tuple[float, ...] | np.ndarray
    label: int | None = None


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def batch(first: int, n: int, channels: int = 4, sensor: int = 1) -> list[Sample]:
    """n samples whose channels all hold their number: first, first + 1, ..."""
    return [
        Sample(sensor, i, None, tuple(float(first + i) for _ in range(channels))) for i in range(n)
    ]


def raw_bytes(path: Path) -> bytes:
    """The database file and its WAL, as they are on disk."""
    wal = path.with_name(path.name + "-wal")
    return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def test_created_with_wal_normal_incremental_vacuum_secure_delete(tmp_path: Path) -> None:
    with SampleStore(tmp_path / "s.db") as store:
        pragma = {
            p: store.db.execute(f"PRAGMA {p}").fetchone()[0]
            for p in ("journal_mode", "synchronous", "auto_vacuum", "secure_delete")
        }
        assert store.integrity_ok()
    assert pragma == {"journal_mode": "wal", "synchronous": 1, "auto_vacuum": 2, "secure_delete": 1}


def test_old_file_without_auto_vacuum_is_converted(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t(x)")
    db.commit()
    db.close()
    with SampleStore(path) as store:
        assert store.db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2


def test_reopen_keeps_samples_and_bounds_apply(tmp_path: Path) -> None:
    with SampleStore(tmp_path / "s.db") as store:
        store.append(batch(0, 50))
    with SampleStore(tmp_path / "s.db", max_rows=20) as store:
        assert store.count() == 50
        assert store.enforce_bounds() == 30
        assert store.count() == 20


def test_row_bound_keeps_the_newest(tmp_path: Path) -> None:
    with SampleStore(tmp_path / "s.db", max_rows=100, enforce_every=1) as store:
        for k in range(10):
            store.append(batch(k * 1000, 25))
        assert store.count() == 100
        _, values = store.window()
        assert values[0, 0] == 6000 and values[-1, 0] == 9024  # batches 6..9 survive, whole
        assert store.enforce_bounds() == 0


def test_append_enforces_every_n_calls(tmp_path: Path) -> None:
    with SampleStore(tmp_path / "s.db", max_rows=10, enforce_every=3) as store:
        store.append(batch(0, 10))
        store.append(batch(1000, 10))
        assert store.count() == 20  # not yet
        store.append(batch(2000, 10))
        assert store.count() == 10


def test_byte_bound_caps_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    max_bytes = 128 * 1024
    with SampleStore(path, max_bytes=max_bytes, enforce_every=1) as store:
        for k in range(40):
            store.append(batch(k * 200, 200, channels=8))  # 6.4 KB of values each
            assert path.stat().st_size <= max_bytes
        n = store.count()
        assert 0 < n < 40 * 200
        latest = store.latest(n)
        assert latest.shape == (n, 8)
        assert latest[-1, 0] == 7999  # the newest samples are kept, the oldest went
        assert latest[0, 0] == 8000 - n
        assert store.integrity_ok()


def test_retention_with_a_fake_clock(tmp_path: Path) -> None:
    clock = FakeClock(1_000.0)
    with SampleStore(tmp_path / "s.db", retention_s=60, clock=clock, enforce_every=1000) as store:
        for k in range(30):  # a batch of 2 every second for 30 s
            store.append(batch(k, 2))
            clock.t += 1
        assert store.enforce_bounds() == 0
        clock.t += 60 - 30 + 15  # the cutoff is now 1015 s: the first 15 batches expire
        assert store.enforce_bounds() == 30
        ts, _ = store.window()
        assert ts.min() == 1_015_000
        clock.t += 3600
        assert store.enforce_bounds() == 30
        assert store.count() == 0


def test_purge_really_deletes_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    secret = [Sample(2, i, None, SECRET) for i in range(2000)]
    with SampleStore(path) as store:
        store.append(batch(0, 2000))
        store.append(secret)
        store.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        assert SECRET.tobytes() in raw_bytes(path)  # or the test below proves nothing
        size_before = path.stat().st_size
        assert store.purge_all() == 4000
        assert store.count() == 0
        assert SECRET.tobytes() not in raw_bytes(path)
        page_size = store.db.execute("PRAGMA page_size").fetchone()[0]
        assert path.stat().st_size <= 4 * page_size < size_before  # header, map, table, index
        assert store.integrity_ok()
    assert SECRET.tobytes() not in raw_bytes(path)


def test_retention_really_deletes_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    clock = FakeClock(0.0)
    with SampleStore(path, retention_s=10, clock=clock) as store:
        store.append([Sample(2, i, None, SECRET) for i in range(200)])  # at t = 0
        clock.t = 60.0
        store.append(batch(0, 200))
        clock.t = 61.0
        assert store.enforce_bounds() == 200
        assert store.count() == 200
        assert SECRET.tobytes() not in raw_bytes(path)


def test_window_and_latest(tmp_path: Path) -> None:
    clock = FakeClock(0.0)
    with SampleStore(tmp_path / "s.db", clock=clock) as store:
        for k in range(10):  # at 0, 10, ..., 90 ms; value k
            clock.t = k / 100
            store.append(batch(k, 1, channels=3))
        clock.t = 1.0
        store.append(batch(1000, 5, channels=3, sensor=7))  # all at 1000 ms
        ts, values = store.window(since_ms=20, until_ms=50)
        assert ts.tolist() == [20, 30, 40]  # half-open: 50 excluded
        assert values.dtype == np.float32 and values.shape == (3, 3)
        assert values[:, 0].tolist() == [2, 3, 4]
        _, picked = store.window(since_ms=20, until_ms=50, channels=[2, 0])
        assert picked.shape == (3, 2)
        ts, values = store.window(sensor_id=7)
        assert ts.tolist() == [1000] * 5
        assert values[:, 0].tolist() == [1000, 1001, 1002, 1003, 1004]  # arrival order
        ts, empty = store.window(since_ms=5000)
        assert ts.shape == (0,) and empty.shape == (0, 0)
        latest = store.latest(3)
        assert latest[:, 0].tolist() == [1002, 1003, 1004]  # oldest first
        assert store.latest(3, sensor_id=1)[:, 0].tolist() == [7, 8, 9]
        assert store.latest(100).shape == (15, 3)
        with pytest.raises(ValueError, match="channels"):
            store.window(channels=[3])


def test_mixed_channel_counts_are_refused(tmp_path: Path) -> None:
    with SampleStore(tmp_path / "s.db") as store:
        store.append(batch(0, 2, channels=3))
        store.append(batch(100, 2, channels=5, sensor=2))
        with pytest.raises(StoreError, match="select one sensor_id"):
            store.latest(4)
        assert store.latest(4, sensor_id=2).shape == (2, 5)


def test_a_bad_sample_writes_nothing_of_its_batch(tmp_path: Path) -> None:
    with SampleStore(tmp_path / "s.db") as store:
        bad = [*batch(0, 5), Sample(1, 5, None, np.zeros((2, 2), np.float32))]
        with pytest.raises(ValueError, match="1-D"):
            store.append(bad)
        assert store.count() == 0


def test_sqlite_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=str(path)) as info:
        SampleStore(path)
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    store = SampleStore(tmp_path / "s.db")
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.count()


def test_bad_bounds_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        SampleStore(tmp_path / "s.db", max_bytes=1000)
    with pytest.raises(ValueError, match="max_rows"):
        SampleStore(tmp_path / "s.db", max_rows=0)


def last_number(out: Path) -> int:
    lines = out.read_text().split("\n")
    complete = lines[:-1]  # the text after the last newline may be a cut-off print
    return int(complete[-1])


@pytest.mark.slow
def test_sigkill_never_loses_a_committed_batch(tmp_path: Path) -> None:
    """Kill a writer at random points; every time the file is intact and nothing committed
    is missing. The writer prints after COMMIT, so a kill between the two leaves one batch
    more than reported; a batch in flight (not committed) must leave no trace."""
    path, size = tmp_path / "crash.db", 37
    rng = random.Random(20240611)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    for run in range(6):
        out = tmp_path / f"writer{run}.out"
        with open(out, "w") as fh:
            proc = subprocess.Popen(
                [sys.executable, str(WRITER), str(path), str(size)], stdout=fh, env=env
            )
            deadline = time.monotonic() + 15
            while out.stat().st_size == 0:  # wait for it to open the store and report
                assert proc.poll() is None, f"writer exited with {proc.returncode}"
                assert time.monotonic() < deadline, "writer did not start"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.02, 0.4))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        reported = last_number(out)
        with SampleStore(path) as store:
            assert store.integrity_ok()
            count = store.count()
            assert count - reported in (0, size), f"run {run}: {count} rows, reported {reported}"
            assert count % size == 0  # whole batches only
    assert reported > 0


def stored_rows(path: Path) -> list[tuple[object, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(
            'SELECT sensor_id, seq, ts_ms, "values", label FROM samples ORDER BY id'
        ).fetchall()
    finally:
        db.close()


def test_a_sample_batch_is_stored_as_its_samples_one_by_one(tmp_path: Path) -> None:
    """The column path (the binary decoder's batches) writes the rows the per-sample path
    writes, non-finite drops and mixed channel counts included, across the 199-row INSERTs."""
    from fedge.firmware_bridge.binary_frames import BinaryDecoder, encode_frame
    from fedge.firmware_bridge.sample import Sample as WireSample
    from fedge.firmware_bridge.sample import SampleBatch

    rng = random.Random(5)
    frames = []
    for i in range(1000):
        width = 8 if i % 50 else rng.choice((1, 3))
        values = [rng.uniform(-1e3, 1e3) for _ in range(width)]
        if i % 97 == 0:
            values[rng.randrange(width)] = rng.choice((float("nan"), float("inf")))
        frames.append(WireSample(1 + i % 3, i & 0xFFFF, i, tuple(values)))
    decoded = BinaryDecoder().feed(b"".join(encode_frame(s) for s in frames))
    assert isinstance(decoded, SampleBatch) and len(decoded) == 1000
    clock = FakeClock()
    with SampleStore(tmp_path / "cols.db", clock=clock) as cols:
        written = cols.append(decoded)
        assert cols.non_finite_dropped == 11 and written == 989
    with SampleStore(tmp_path / "rows.db", clock=clock) as rows:
        assert rows.append(list(decoded)) == 989
    assert stored_rows(tmp_path / "cols.db") == stored_rows(tmp_path / "rows.db")
    assert len(stored_rows(tmp_path / "cols.db")) == 989


def test_a_batch_with_an_empty_sample_writes_nothing(tmp_path: Path) -> None:
    """(The binary decoder refuses a frame of no values as bad_length, so none comes from
    it; a caller's batch may still hold one.)"""
    batch = [Sample(1, 0, None, (1.0, 2.0)), Sample(1, 1, None, ())]
    with SampleStore(tmp_path / "s.db") as store:
        with pytest.raises(ValueError, match="non-empty"):
            store.append(batch)
        assert store.count() == 0


def test_labelled_and_unlabelled_samples_in_one_batch(tmp_path: Path) -> None:
    mixed = [Sample(1, i, None, (float(i),), label=(i % 3 if i % 2 else None)) for i in range(600)]
    with SampleStore(tmp_path / "s.db") as store:
        assert store.append(mixed) == 600  # three INSERT statements of at most 249 rows
        values, labels = store.latest_labelled(1000)
    odd = [s for s in mixed if s.label is not None]
    assert values[:, 0].tolist() == [s.values[0] for s in odd]
    assert labels.tolist() == [s.label for s in odd]
    assert [r[4] for r in stored_rows(tmp_path / "s.db")] == [s.label for s in mixed]

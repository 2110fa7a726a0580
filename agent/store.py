"""The device's local sample store: sensor samples in SQLite, bounded, with retention.

Samples arrive from the firmware bridge and stay on the device; the trainer turns windows of
them into examples. One loop owns a ``SampleStore`` (one writer, one connection).

Schema: ``samples(id, sensor_id, seq, ts_ms, values, label)`` with an index on ``ts_ms``.
``values`` is a float32 little-endian array. A sample with a non-finite value (NaN, inf, or a
number beyond float32) is dropped before it is stored, never trained on: it is counted in
``non_finite_dropped`` and logged at WARNING for the first and then every
``NON_FINITE_LOG_EVERY``-th (a sensor that sends NaN sends many).
``ts_ms`` is the device receive time in Unix milliseconds, read from the store's injected
``clock`` when ``append`` is called: every sample of a batch gets the same ``ts_ms`` and keeps
its arrival order through ``id``. The sample's own ``timestamp_ms`` is the MCU's ``millis()``
(wraps, may be None), useless for retention across reboots, and is not stored.

Durability (WAL, ``synchronous=NORMAL``):
    Each ``append`` call is ONE transaction; batching is the caller's job (the agent's serial
    reader hands over one batch per half second or 10,000 samples, so a crash also loses
    what it held: ``fedge.firmware_bridge.reader``). A killed process
    (SIGKILL, OOM, crash) loses at most the batch in flight: a committed transaction is in
    the WAL in the OS page cache. A power cut may also lose the last few committed
    transactions, because NORMAL syncs the WAL only at checkpoints, not at every commit; it
    never corrupts the file (the WAL is checksummed and an incomplete tail is discarded on
    open). ``synchronous=FULL`` would fsync every commit, which costs SD-card wear and
    latency for sensor samples that are cheap to lose.

Bounds (``enforce_bounds``, run by ``append`` every ``enforce_every`` calls and on demand).
The row and byte bounds drop the first-appended samples first (by ``id``, not ``ts_ms``: a
Pi without a real-time clock may step its clock backwards at boot or on NTP sync):
    - ``retention_s``: samples with ``ts_ms`` older than ``clock() - retention_s`` are deleted.
    - ``max_rows``: at most this many samples.
    - ``max_bytes``: the main database file is at most this size after enforcement. The
      WAL file comes on top: up to about ``wal_autocheckpoint`` (1000) pages between
      checkpoints. Between enforcements the store may exceed its bounds by the appends made
      since the last one.

Deleting really deletes:
    - ``secure_delete=ON`` makes SQLite overwrite deleted content with zeros, in the page
      and on the freelist, so the bytes are gone from the file and not merely unlinked.
    - The WAL still holds old copies of the pages until it is reset, so after deleting
      anything the store runs ``wal_checkpoint(TRUNCATE)``, which empties the WAL file.
    - ``auto_vacuum=INCREMENTAL`` is set when the file is created (SQLite cannot switch it
      on later without a full ``VACUUM``, which the store runs once if it opens an older
      file without it). Vacuum policy: free pages are kept for reuse by the next appends
      (a bounded store is a ring buffer; vacuuming every deletion would double the writes
      to flash), except (a) pages beyond ``max_bytes`` are given back at once, (b) when more
      than a quarter of the file is free pages it is shrunk with ``incremental_vacuum``
      (e.g. after retention drops a long backlog), and (c) ``purge_all`` always shrinks the
      file to its minimum.

Errors::

    RuntimeError
     └── StoreError     sqlite failed; the message names the database file

Bad input (a sample whose values are not a 1-D float array) raises ``ValueError`` before
anything is written.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Protocol

import numpy as np
from fedge.firmware_bridge.sample import SampleBatch

log = logging.getLogger("fedge.agent")

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id        INTEGER PRIMARY KEY,
    sensor_id INTEGER NOT NULL,
    seq       INTEGER,            -- the MCU's frame counter, when it sends one
    ts_ms     INTEGER NOT NULL,   -- device receive time, Unix ms (the store's clock)
    "values"  BLOB NOT NULL,      -- float32 little-endian, one per channel
    label     INTEGER             -- NULL when unlabelled
);
CREATE INDEX IF NOT EXISTS samples_ts_ms ON samples(ts_ms);
"""

_VALUE_DTYPE = np.dtype("<f4")
_AUTO_VACUUM_INCREMENTAL = 2
_VACUUM_FREE_FRACTION = 0.25  # shrink the file when more than this share of it is free pages
_VACUUM_MIN_FREE_PAGES = 64  # ... and at least this many (do not churn over a few pages)
MIN_MAX_BYTES = 64 * 1024  # an empty store is a few pages; below this a bound is meaningless
NON_FINITE_LOG_EVERY = 1000  # after the first, log every this many non-finite samples dropped
# Rows per INSERT statement: 1 + 4 parameters a row stay within 999, the limit of SQLite
# before 3.32. One statement of many rows, with the shared receive time bound once (and no
# label parameter when no row has one), costs about half as much per row as executemany.
_ROWS_PER_INSERT = 249


class StoreError(RuntimeError):
    """SQLite failed; the message names the database file."""


class SampleLike(Protocol):
    """What the store reads of a sample (``fedge.firmware_bridge.sample.Sample`` fits)."""

    @property
    def sensor_id(self) -> int: ...
    @property
    def seq(self) -> int | None: ...
    @property
    def values(self) -> Sequence[float] | np.ndarray: ...
    @property
    def label(self) -> int | None: ...


# sensor_id, seq, values and label; or without the label when no row of the batch has one
Row = tuple[int, int | None, bytes, int | None] | tuple[int, int | None, bytes]


def _values(sample: SampleLike) -> np.ndarray:
    with np.errstate(over="ignore"):  # a number beyond float32 becomes inf: dropped as such
        values = np.asarray(sample.values, dtype=_VALUE_DTYPE)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(
            f"sample from sensor {sample.sensor_id}: values must be a non-empty 1-D array, "
            f"got shape {values.shape}"
        )
    return values


def _row(sample: SampleLike, values: np.ndarray) -> tuple[int, int | None, bytes, int | None]:
    seq = None if sample.seq is None else int(sample.seq)
    label = None if sample.label is None else int(sample.label)
    return (int(sample.sensor_id), seq, values.tobytes(), label)


@functools.lru_cache(maxsize=8)
def _insert_sql(rows: int, labelled: bool) -> str:
    """INSERT of ``rows`` rows; parameter 1 is the receive time of all of them."""
    width = 4 if labelled else 3
    tuples = []
    for r in range(rows):
        a = 2 + width * r
        label = f"?{a + 3}" if labelled else "NULL"
        tuples.append(f"(?{a}, ?{a + 1}, ?1, ?{a + 2}, {label})")
    return 'INSERT INTO samples(sensor_id, seq, ts_ms, "values", label) VALUES ' + ", ".join(tuples)


def _insert(db: sqlite3.Connection, ts_ms: int, rows: list[Row], labelled: bool) -> None:
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        part = rows[start : start + _ROWS_PER_INSERT]
        db.execute(_insert_sql(len(part), labelled), [ts_ms, *chain.from_iterable(part)])


class SampleStore:
    """Sensor samples on the device, bounded by rows, bytes and age. See the module docstring.

    ``clock`` returns Unix seconds (``time.time``); tests pass a fake one.
    ``enforce_every``: ``append`` runs ``enforce_bounds`` after every this many calls.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_rows: int | None = None,
        max_bytes: int | None = None,
        retention_s: float | None = None,
        clock: Callable[[], float] = time.time,
        enforce_every: int = 10,
    ) -> None:
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        if max_bytes is not None and max_bytes < MIN_MAX_BYTES:
            raise ValueError(f"max_bytes must be at least {MIN_MAX_BYTES}, got {max_bytes}")
        if retention_s is not None and retention_s <= 0:
            raise ValueError(f"retention_s must be positive, got {retention_s}")
        if enforce_every < 1:
            raise ValueError(f"enforce_every must be at least 1, got {enforce_every}")
        self.path = Path(path)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.retention_s = retention_s
        self._clock = clock
        self._enforce_every = enforce_every
        self._appends = 0
        self.non_finite_dropped = 0  # samples with a NaN or inf value, never stored
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db: sqlite3.Connection | None = None
        with self._boundary("open"):
            # One loop owns the store, but it may be built in another thread than the one
            # that runs it (fedge sim, tests): never used from two threads at once.
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                self._rows = self._open(db)
            except BaseException:
                db.close()
                raise
            self._db = db

    def _open(self, db: sqlite3.Connection) -> int:
        """Set the pragmas, create the schema; return the number of stored samples."""
        # Must precede the first table: on an existing file it is a no-op (see below).
        db.execute(f"PRAGMA auto_vacuum={_AUTO_VACUUM_INCREMENTAL}")
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"journal_mode is {mode}, WAL refused")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA secure_delete=ON")
        db.executescript(SCHEMA)
        if db.execute("PRAGMA auto_vacuum").fetchone()[0] != _AUTO_VACUUM_INCREMENTAL:
            log.info("%s: created without incremental auto_vacuum; converting", self.path)
            db.execute("VACUUM")
        return int(db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])

    # -- boundary -------------------------------------------------------------------------

    @contextmanager
    def _boundary(self, op: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise StoreError(f"sample store {self.path}: {op} failed: {exc}") from exc

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"sample store {self.path} is closed")
        return self._db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- writing --------------------------------------------------------------------------

    def append(self, samples: Iterable[SampleLike] | SampleBatch) -> int:
        """Store a batch in one transaction; return how many samples were written.

        All or nothing: a SIGKILL during the call loses at most this batch, never an
        earlier one. Every ``enforce_every`` calls the bounds are enforced afterwards.
        Samples with a non-finite value are dropped and counted (module docstring).
        A ``SampleBatch`` (the binary decoder's) is read as columns, without a Python
        object per sample.
        """
        now_ms = int(self._clock() * 1000)
        if isinstance(samples, SampleBatch):
            rows, labelled = self._batch_rows(samples), False
        else:
            labelled_rows = []
            for sample, values in [(s, _values(s)) for s in samples]:
                if np.isfinite(values).all():
                    labelled_rows.append(_row(sample, values))
                else:
                    self._drop_non_finite(sample, values)
            labelled = any(row[3] is not None for row in labelled_rows)
            rows = list(labelled_rows) if labelled else [row[:3] for row in labelled_rows]
        if not rows:
            return 0
        with self._boundary(f"append of {len(rows)} samples"), self._transaction() as db:
            _insert(db, now_ms, rows, labelled)
        self._rows += len(rows)
        self._appends += 1
        if self._appends % self._enforce_every == 0:
            self.enforce_bounds()
        return len(rows)

    def _batch_rows(self, batch: SampleBatch) -> list[Row]:
        """The rows of ``batch`` (no labels), as ``append`` makes them of samples one by one."""
        empty = np.flatnonzero(batch.channels == 0)
        if len(empty):
            raise ValueError(
                f"sample from sensor {batch.sensor_id[empty[0]]}: values must be a non-empty "
                "1-D array, got shape (0,)"
            )
        finite = np.isfinite(batch.values).all(axis=1)  # the padding is zeros: finite
        if not finite.all():
            for i in np.flatnonzero(~finite).tolist():
                sample = batch[i]
                self._drop_non_finite(sample, np.asarray(sample.values, _VALUE_DTYPE))
            batch = batch[finite]
        values = np.ascontiguousarray(batch.values, _VALUE_DTYPE)
        width = values.shape[1]
        if (batch.channels == width).all():  # one channel count: each row's bytes, in C
            blobs = values.view(np.dtype((np.void, width * _VALUE_DTYPE.itemsize))).ravel()
            blob_list = blobs.tolist()
        else:
            blob_list = [values[i, :c].tobytes() for i, c in enumerate(batch.channels.tolist())]
        return list(
            zip(
                batch.sensor_id.tolist(),
                batch.seq.tolist(),
                blob_list,
                strict=True,
            )
        )

    def _drop_non_finite(self, sample: SampleLike, values: np.ndarray) -> None:
        self.non_finite_dropped += 1
        n = self.non_finite_dropped
        if n == 1 or n % NON_FINITE_LOG_EVERY == 0:
            channels = np.flatnonzero(~np.isfinite(values)).tolist()
            log.warning(
                "%s: dropped a sample of sensor %d with non-finite values %s in channel(s) %s;"
                " %d dropped so far (logged every %d)",
                self.path,
                sample.sensor_id,
                [float(values[c]) for c in channels[:4]],
                channels[:4],
                n,
                NON_FINITE_LOG_EVERY,
            )

    def _cutoff_ms(self) -> int:
        assert self.retention_s is not None
        return int((self._clock() - self.retention_s) * 1000)

    def enforce_bounds(self) -> int:
        """Delete expired samples, then the oldest beyond the row and byte bounds.

        Returns the number of samples deleted. Deleted data is overwritten (secure_delete)
        and the WAL is emptied, so it is gone from the files on return.
        """
        with self._boundary("enforce_bounds"):
            rows = self._rows
            deleted = 0
            with self._transaction() as db:
                if self.retention_s is not None:
                    cur = db.execute("DELETE FROM samples WHERE ts_ms < ?", (self._cutoff_ms(),))
                    deleted += cur.rowcount
                if self.max_rows is not None and rows - deleted > self.max_rows:
                    deleted += self._delete_oldest(db, rows - deleted - self.max_rows)
                if self.max_bytes is not None:
                    deleted += self._fit_bytes(db, rows - deleted, self.max_bytes)
            self._rows = rows - deleted
            self._shrink()
            if deleted:
                self._checkpoint()
        if deleted:
            log.debug("%s: bounds deleted %d samples, %d left", self.path, deleted, self._rows)
        return deleted

    @staticmethod
    def _delete_oldest(db: sqlite3.Connection, n: int) -> int:
        cur = db.execute(
            "DELETE FROM samples WHERE id IN (SELECT id FROM samples ORDER BY id LIMIT ?)",
            (n,),
        )
        return cur.rowcount

    def _fit_bytes(self, db: sqlite3.Connection, rows: int, max_bytes: int) -> int:
        """Delete the oldest rows until the pages in use fit ``max_bytes``."""
        page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        deleted = 0
        while rows - deleted > 0:
            pages = int(db.execute("PRAGMA page_count").fetchone()[0])
            free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
            used = (pages - free) * page_size
            if used <= max_bytes:
                break
            per_row = used / (rows - deleted)
            n = max(1, int((used - max_bytes) / per_row) + 1)
            deleted += self._delete_oldest(db, n)
        return deleted

    def _shrink(self) -> None:
        """The vacuum policy of the module docstring; runs outside any transaction."""
        db = self.db
        pages = int(db.execute("PRAGMA page_count").fetchone()[0])
        free = int(db.execute("PRAGMA freelist_count").fetchone()[0])
        if free == 0:
            return
        n = 0
        if free > _VACUUM_MIN_FREE_PAGES and free > pages * _VACUUM_FREE_FRACTION:
            n = free
        if self.max_bytes is not None:
            page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
            n = max(n, min(free, pages - self.max_bytes // page_size))
        if n > 0:
            # executescript steps the pragma to completion; execute() frees one page only.
            db.executescript(f"PRAGMA incremental_vacuum({int(n)})")

    def _checkpoint(self) -> None:
        busy, _, _ = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            log.warning(
                "%s: WAL checkpoint blocked by a reader; deleted data stays in the WAL "
                "until the next checkpoint",
                self.path,
            )

    def purge_all(self) -> int:
        """Delete every sample and shrink the files; return how many were deleted."""
        with self._boundary("purge_all"):
            with self._transaction() as db:
                deleted = db.execute("DELETE FROM samples").rowcount
            self._rows = 0
            self.db.executescript("PRAGMA incremental_vacuum")
            self._checkpoint()
        log.info("%s: purged %d samples", self.path, deleted)
        return deleted

    # -- reading --------------------------------------------------------------------------

    def count(self) -> int:
        with self._boundary("count"):
            return int(self.db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])

    def latest(self, n: int, *, sensor_id: int | None = None) -> np.ndarray:
        """The last ``n`` samples appended, in arrival order: float32 ``(rows, channels)``."""
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        where, args = ("WHERE sensor_id = ?", [sensor_id]) if sensor_id is not None else ("", [])
        with self._boundary("latest"):
            rows = self.db.execute(
                f'SELECT "values" FROM (SELECT id, "values" FROM samples {where} '
                "ORDER BY id DESC LIMIT ?) ORDER BY id",
                [*args, n],
            ).fetchall()
        return self._stack([r[0] for r in rows])

    def latest_labelled(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The last ``n`` samples that carry a label: (values (rows, channels), labels int32)."""
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        with self._boundary("latest_labelled"):
            rows = self.db.execute(
                'SELECT "values", label FROM (SELECT id, "values", label FROM samples '
                "WHERE label IS NOT NULL ORDER BY id DESC LIMIT ?) ORDER BY id",
                [n],
            ).fetchall()
        return self._stack([r[0] for r in rows]), np.array([r[1] for r in rows], np.int32)

    def window(
        self,
        since_ms: int | None = None,
        until_ms: int | None = None,
        channels: Sequence[int] | None = None,
        *,
        sensor_id: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Samples with ``since_ms <= ts_ms < until_ms`` (either end open when None).

        Returns ``(ts_ms int64 (rows,), values float32 (rows, channels))`` ordered by time,
        then arrival.
        ``channels`` picks columns by index; ``sensor_id`` keeps one sensor's samples.
        """
        clauses: list[str] = []
        args: list[int] = []
        for clause, value in (
            ("ts_ms >= ?", since_ms),
            ("ts_ms < ?", until_ms),
            ("sensor_id = ?", sensor_id),
        ):
            if value is not None:
                clauses.append(clause)
                args.append(int(value))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._boundary("window"):
            rows = self.db.execute(
                f'SELECT ts_ms, "values" FROM samples {where} ORDER BY ts_ms, id', args
            ).fetchall()
        ts = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        values = self._stack([r[1] for r in rows])
        if channels is not None:
            picked = list(channels)
            width = values.shape[1]
            if rows and any(not -width <= c < width for c in picked):
                raise ValueError(f"channels {picked} out of range for {width} channels")
            values = values[:, picked] if rows else np.empty((0, len(picked)), np.float32)
        return ts, values

    def _stack(self, blobs: list[bytes]) -> np.ndarray:
        if not blobs:
            return np.empty((0, 0), np.float32)
        sizes = {len(b) for b in blobs}
        if len(sizes) != 1:
            channels = sorted(s // _VALUE_DTYPE.itemsize for s in sizes)
            raise StoreError(
                f"sample store {self.path}: samples with {channels} channels in one query; "
                "select one sensor_id"
            )
        width = sizes.pop() // _VALUE_DTYPE.itemsize
        flat = np.frombuffer(b"".join(blobs), dtype=_VALUE_DTYPE)
        return flat.reshape(len(blobs), width).astype(np.float32)

    # -- housekeeping ---------------------------------------------------------------------

    def integrity_ok(self) -> bool:
        """``PRAGMA integrity_check`` says "ok"; the problems are logged otherwise."""
        with self._boundary("integrity_check"):
            result = [r[0] for r in self.db.execute("PRAGMA integrity_check").fetchall()]
        if result == ["ok"]:
            return True
        log.error("%s: integrity check failed: %s", self.path, "; ".join(result[:10]))
        return False

    def close(self) -> None:
        if self._db is None:
            return
        db, self._db = self._db, None
        with self._boundary("close"):
            db.close()

    def __enter__(self) -> SampleStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The aggregator's memory: rounds, updates and global models in SQLite (WAL).

A restart resumes from the newest global model, and a round that was open when the process
died resumes with the updates it had accepted (their deltas are kept with them). A state file
that exists but cannot be trusted (empty, truncated, not a database, failing SQLite's
integrity check, without a global model) is refused with ``StoreCorrupt``, never silently
replaced: the message says to restore the rotating backup (``backup()``) or to start afresh.
"""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    version   INTEGER PRIMARY KEY,
    round_id  INTEGER NOT NULL,
    created   REAL NOT NULL,
    weights   BLOB NOT NULL          -- the float32 tensors (_pack)
);
CREATE TABLE IF NOT EXISTS strategy_state (
    version   INTEGER PRIMARY KEY,   -- the model version this state produced
    state     BLOB NOT NULL          -- the strategy's arrays (momentum, moments; _pack)
);
CREATE TABLE IF NOT EXISTS rounds (
    round_id      INTEGER PRIMARY KEY,
    model_version INTEGER NOT NULL,
    status        TEXT NOT NULL,      -- open | done | failed | abandoned
    started       REAL NOT NULL,
    deadline      REAL NOT NULL,
    finished      REAL,
    selected      TEXT NOT NULL,      -- JSON list of device ids
    summary       TEXT                -- JSON: the line written to rounds.jsonl
);
-- Accepted answers only (what a device that was not selected sends is counted, not kept).
CREATE TABLE IF NOT EXISTS answers (
    device_id   TEXT NOT NULL,
    update_id   TEXT NOT NULL,        -- unique per device: a resent update is applied once
    round_id    INTEGER NOT NULL,
    kind        TEXT NOT NULL,        -- update | skip
    num_samples INTEGER NOT NULL,     -- as declared (the average clips it)
    trained     INTEGER NOT NULL,     -- skip notices: the device trained, its update is held back
    train_loss  REAL,
    nbytes      INTEGER NOT NULL,     -- the message's payload
    received    REAL NOT NULL,
    delta       BLOB,                 -- the decoded delta (updates only; _pack)
    -- MQTT bytes the device had sent for the round when this answer was taken, refused
    -- messages and chunk headers included (NULL: kept by a version that did not count them).
    wire        INTEGER,
    PRIMARY KEY (device_id, update_id)
);
CREATE INDEX IF NOT EXISTS answers_by_round ON answers(round_id);
-- Chunks of updates not yet whole: a crash must not lose what the broker no longer holds.
CREATE TABLE IF NOT EXISTS chunks (
    device_id  TEXT NOT NULL,
    message_id BLOB NOT NULL,
    idx        INTEGER NOT NULL,
    payload    BLOB NOT NULL,
    received   REAL NOT NULL,
    PRIMARY KEY (device_id, message_id, idx)
);
-- Whether each selected device answered its round in time (update or skip notice), the last
-- few selections per device: who is reliable survives a restart. A state file made before
-- this table existed gets it here, empty (everyone starts as reliable).
CREATE TABLE IF NOT EXISTS outcomes (
    device_id TEXT NOT NULL,
    round_id  INTEGER NOT NULL,
    answered  INTEGER NOT NULL,       -- 1: answered in time, 0: missed
    PRIMARY KEY (device_id, round_id)
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""
BACKUPS = 2  # aggregator.sqlite.bak (newest) and aggregator.sqlite.bak.1
# The meta key a backup copy carries (when it was taken), the live state never: a state that
# has it is a restored backup (Aggregator._catch_up), which the fleet may be ahead of.
BACKUP_MARK = "backup_taken"


def read_back(path: Path, block: int = 1 << 16) -> Iterator[dict[str, Any]]:
    """The records of a JSON-lines file (rounds.jsonl), newest first, read from its end: a
    start reads its tail, not the whole history. Lines that hold no record (one a crash cut
    short) are passed over; no file: none."""
    try:
        with open(path, "rb") as fh:
            yield from _records_back(fh, block)
    except (FileNotFoundError, NotADirectoryError):
        return


def _records_back(fh: BinaryIO, block: int) -> Iterator[dict[str, Any]]:
    pos = fh.seek(0, os.SEEK_END)
    head = b""  # the start of a line whose beginning is in the block before
    while pos > 0:
        step = min(block, pos)
        pos -= step
        fh.seek(pos)
        lines = (fh.read(step) + head).split(b"\n")
        head = lines.pop(0) if pos > 0 else b""
        for line in reversed(lines):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


class StoreError(RuntimeError):
    """SQLite failed; the message names the database file."""


class StoreCorrupt(StoreError):
    """The state file exists but cannot be trusted; the message says what to do."""


@dataclass(frozen=True)
class Answer:
    """An accepted update or skip notice of a round, as kept for a resumed round."""

    device_id: str
    update_id: str
    kind: str
    num_samples: int
    trained: bool
    train_loss: float | None
    nbytes: int
    delta: dict[str, np.ndarray] | None
    wire: int | None = None  # the device's MQTT bytes for the round so far (None: not kept)


# Tensors in a blob: this magic, a 4-byte length, a JSON list of [name, dtype, shape], and the
# tensors' bytes in that order (C order). A tenth of np.savez's time, which the aggregator
# paid for every update it kept (zip headers and a .npy header per tensor): blobs written
# before (np.savez, a zip file: "PK") are still read.
_BLOB_MAGIC = b"FSA1"
_BLOB_HEAD = struct.Struct(">4sI")


def _pack(weights: dict[str, np.ndarray]) -> bytes:
    arrays = [(name, np.asarray(value, order="C")) for name, value in weights.items()]
    index = json.dumps([[name, a.dtype.str, list(a.shape)] for name, a in arrays]).encode()
    return b"".join(
        [_BLOB_HEAD.pack(_BLOB_MAGIC, len(index)), index, *(a.tobytes() for _, a in arrays)]
    )


def _unpack(blob: bytes) -> dict[str, np.ndarray]:
    if blob[:2] == b"PK":  # np.savez, as written before
        import io

        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    try:
        magic, size = _BLOB_HEAD.unpack_from(blob)
        if magic != _BLOB_MAGIC:
            raise ValueError(f"unknown blob format {magic!r}")
        offset = _BLOB_HEAD.size + size
        out: dict[str, np.ndarray] = {}
        for name, dtype, shape in json.loads(blob[_BLOB_HEAD.size : offset]):
            dt = np.dtype(dtype)
            if dt.hasobject:
                raise ValueError(f"tensor {name!r} of objects")
            count = int(np.prod(shape, dtype=np.int64))
            value = np.frombuffer(blob, dt, count, offset).reshape(tuple(shape))
            out[str(name)] = value.copy()  # writable, as np.load's
            offset += count * dt.itemsize
    except (struct.error, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise ValueError(f"unreadable tensor blob: {exc}") from exc
    if offset != len(blob):
        raise ValueError(f"tensor blob of {len(blob)} bytes holds {offset}")
    return out


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        if path.parent.exists() and not path.parent.is_dir():
            raise StoreError(f"state_dir {path.parent} is a file, not a folder")
        if path.exists() and not path.is_file():
            raise StoreError(f"{path} is not a file")
        existed = path.is_file()
        if existed and path.stat().st_size == 0:
            raise self._corrupt("is empty")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot make the state folder {path.parent}: {exc.strerror}") from exc
        try:
            # One loop owns the store, but it may be built in another thread than the
            # one that runs it (fedge sim, tests): never used from two threads at once.
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: {exc}") from exc
        try:
            if existed:
                verdict = self.db.execute("PRAGMA quick_check").fetchone()[0]
                if verdict != "ok":
                    raise self._corrupt(f"fails SQLite's integrity check ({verdict})")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            self._upgrade()
            if existed and self._has_history() and self.latest_model() is None:
                raise self._corrupt("has rounds but no global model")
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise self._corrupt(f"is not a readable SQLite database ({exc})") from exc
        except StoreError:
            self.db.close()
            raise

    @property
    def backup_path(self) -> Path:
        return self.path.with_name(self.path.name + ".bak")

    def _corrupt(self, what: str) -> StoreCorrupt:
        backup = self.backup_path
        restore = (
            f"restore the backup {backup} (move {self.path.name}-wal and -shm aside, if any,"
            f" and copy it over {self.path.name})"
            if backup.is_file()
            else "restore it from a backup"
        )
        return StoreCorrupt(
            f"aggregator state {self.path} {what}: {restore}, or start afresh with"
            " `fedge aggregator --config CONFIG --reset-state`"
        )

    def _upgrade(self) -> None:
        """Columns added since the state file was made (new tables come with SCHEMA)."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(answers)")}
        if "wire" not in columns:
            self.db.execute("ALTER TABLE answers ADD COLUMN wire INTEGER")

    def _has_history(self) -> bool:
        return self.db.execute("SELECT 1 FROM rounds LIMIT 1").fetchone() is not None

    def backup(self) -> Path:
        """A consistent copy (SQLite's online backup) as ``.bak``; the previous one moves to
        ``.bak.1``. Written beside it and renamed, so a crash leaves the old backup whole.
        The copy carries ``BACKUP_MARK``: restored, it says so."""
        target = self.backup_path
        tmp = target.with_name(target.name + ".tmp")
        for suffix in ("", "-wal", "-shm", "-journal"):  # (what a crash left of one)
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        dest = sqlite3.connect(tmp)
        try:
            self.db.backup(dest)
            dest.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                (BACKUP_MARK, repr(time.time())),
            )
            dest.commit()
        finally:
            dest.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        for i in range(BACKUPS - 1, 0, -1):
            older = target.with_name(f"{target.name}.{i}")
            newer = target if i == 1 else target.with_name(f"{target.name}.{i - 1}")
            if newer.exists():
                os.replace(newer, older)
        os.replace(tmp, target)
        return target

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything inside commits together or not at all (a crash leaves the old state)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def latest_model(self) -> tuple[int, int, dict[str, np.ndarray]] | None:
        row = self.db.execute(
            "SELECT version, round_id, weights FROM models ORDER BY version DESC LIMIT 1"
        ).fetchone()
        return None if row is None else (row[0], row[1], _unpack(row[2]))

    def save_model(self, version: int, round_id: int, weights: dict[str, np.ndarray]) -> None:
        self.db.execute(
            "INSERT INTO models(version, round_id, created, weights) VALUES (?, ?, ?, ?)",
            (version, round_id, time.time(), _pack(weights)),
        )

    def save_strategy_state(self, version: int, state: dict[str, np.ndarray]) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO strategy_state(version, state) VALUES (?, ?)",
            (version, _pack(state)),
        )

    def strategy_state(self, version: int) -> dict[str, np.ndarray]:
        row = self.db.execute(
            "SELECT state FROM strategy_state WHERE version=?", (version,)
        ).fetchone()
        return {} if row is None else _unpack(row[0])

    def last_round_id(self) -> int:
        """The newest round id used, by this state or (after a reset) by the one before it."""
        row = self.db.execute("SELECT MAX(round_id) FROM rounds").fetchone()
        return max(int(row[0] or 0), int(self.meta("round_floor") or 0))

    def completed_rounds(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM rounds WHERE status='done'").fetchone()[0])

    def abandon_open_rounds(self, except_round: int | None = None) -> int:
        cur = self.db.execute(
            "UPDATE rounds SET status='abandoned', finished=?"
            " WHERE status='open' AND round_id IS NOT ?",
            (time.time(), except_round),
        )
        return cur.rowcount

    def open_rounds(self) -> list[tuple[int, int, float, float, list[str]]]:
        """Rounds still open: (round id, model version, started, deadline, selected)."""
        rows = self.db.execute(
            "SELECT round_id, model_version, started, deadline, selected FROM rounds"
            " WHERE status='open' ORDER BY round_id"
        ).fetchall()
        return [(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows]

    def answers(self, round_id: int) -> Iterator[Answer]:
        """The round's accepted answers in the order they came, one at a time (a resumed
        round folds each into its sum: the deltas are never all in memory)."""
        rows = self.db.execute(
            "SELECT device_id, update_id, kind, num_samples, trained, train_loss, nbytes, delta,"
            " wire FROM answers WHERE round_id=? ORDER BY received",
            (round_id,),
        )
        for r in rows:
            yield Answer(
                r[0],
                r[1],
                r[2],
                r[3],
                bool(r[4]),
                r[5],
                r[6],
                None if r[7] is None else _unpack(r[7]),
                r[8],
            )

    def answer_kinds(self, round_id: int) -> dict[str, str]:
        """The round's accepted answers without their deltas: {device: update | skip}."""
        rows = self.db.execute(
            "SELECT device_id, kind FROM answers WHERE round_id=?", (round_id,)
        ).fetchall()
        return {str(d): str(k) for d, k in rows}

    def answer_delta(self, round_id: int, device_id: str) -> dict[str, np.ndarray]:
        """The delta of ``device_id``'s update in the round (it must have one)."""
        row = self.db.execute(
            "SELECT delta FROM answers WHERE round_id=? AND device_id=? AND delta IS NOT NULL",
            (round_id, device_id),
        ).fetchone()
        if row is None:
            raise StoreError(f"round {round_id}: no update of {device_id} kept")
        return _unpack(row[0])

    def compact(self, closed_round: int, keep_from_version: int) -> None:
        """Drop what a closed round no longer needs: its answers (the model holds them now)
        and models and strategy states older than ``keep_from_version``. Keeps the
        database, and its backups, from growing with every round."""
        # A closed round's answers are in its model; a late copy is refused as wrong_round.
        self.db.execute("DELETE FROM answers WHERE round_id<=?", (closed_round,))
        self.db.execute("DELETE FROM models WHERE version<?", (keep_from_version,))
        self.db.execute("DELETE FROM strategy_state WHERE version<?", (keep_from_version,))

    def save_chunk(self, device_id: str, message_id: bytes, idx: int, payload: bytes) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?, ?)",
            (device_id, message_id, idx, payload, time.time()),
        )

    def forget_chunks(self, message_id: bytes, device_id: str | None = None) -> None:
        if device_id is None:
            self.db.execute("DELETE FROM chunks WHERE message_id=?", (message_id,))
        else:
            self.db.execute(
                "DELETE FROM chunks WHERE message_id=? AND device_id=?", (message_id, device_id)
            )

    def chunks(self) -> list[tuple[str, bytes]]:
        """Chunks of messages that were not whole yet: (device, chunk), in arrival order."""
        rows = self.db.execute("SELECT device_id, payload FROM chunks ORDER BY received").fetchall()
        return [(str(r[0]), bytes(r[1])) for r in rows]

    def last_round_start(self) -> float | None:
        """When the newest round started (None: no round yet)."""
        row = self.db.execute("SELECT MAX(started) FROM rounds").fetchone()
        return None if row[0] is None else float(row[0])

    def record_outcomes(self, round_id: int, answered: dict[str, bool], keep: int) -> None:
        """Who of a closed round's selection answered in time; each device's ``keep`` newest
        outcomes are kept."""
        with self.transaction():
            for device, ok in answered.items():
                self.db.execute(
                    "INSERT OR REPLACE INTO outcomes VALUES (?, ?, ?)", (device, round_id, int(ok))
                )
                self.db.execute(
                    "DELETE FROM outcomes WHERE device_id=? AND round_id NOT IN (SELECT round_id"
                    " FROM outcomes WHERE device_id=? ORDER BY round_id DESC LIMIT ?)",
                    (device, device, keep),
                )

    def outcomes(self) -> dict[str, list[tuple[int, bool]]]:
        """Each device's kept outcomes, (round id, answered in time), oldest first."""
        history: dict[str, list[tuple[int, bool]]] = {}
        rows = self.db.execute(
            "SELECT device_id, round_id, answered FROM outcomes ORDER BY round_id"
        )
        for device, round_id, ok in rows:
            history.setdefault(str(device), []).append((int(round_id), bool(ok)))
        return history

    def set_answer_wire(self, round_id: int, device_id: str, wire: int) -> None:
        """The MQTT bytes ``device_id`` has sent for the round so far, refused ones included."""
        self.db.execute(
            "UPDATE answers SET wire=? WHERE round_id=? AND device_id=?",
            (wire, round_id, device_id),
        )

    def spares(self, now: float, rounds: int) -> dict[int, tuple[float, set[str]]]:
        """Of the last ``rounds`` closed rounds, those whose deadline is still ahead, with the
        selected devices kept as not having answered: {round id: (deadline, devices)}."""
        rows = self.db.execute(
            "SELECT round_id, deadline FROM rounds WHERE status IN ('done', 'failed')"
            " ORDER BY round_id DESC LIMIT ?",
            (rounds,),
        ).fetchall()
        out: dict[int, tuple[float, set[str]]] = {}
        for round_id, deadline in rows:
            if deadline < now:
                continue
            missed = self.db.execute(
                "SELECT device_id FROM outcomes WHERE round_id=? AND answered=0", (round_id,)
            )
            devices = {str(d) for (d,) in missed}
            if devices:
                out[int(round_id)] = (float(deadline), devices)
        return out

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def forget_meta(self, key: str) -> None:
        self.db.execute("DELETE FROM meta WHERE key=?", (key,))

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def open_round(
        self,
        round_id: int,
        model_version: int,
        started: float,
        deadline: float,
        selected: list[str],
    ) -> None:
        self.db.execute(
            "INSERT INTO rounds(round_id, model_version, status, started, deadline, selected)"
            " VALUES (?, ?, 'open', ?, ?, ?)",
            (round_id, model_version, started, deadline, json.dumps(selected)),
        )

    def close_round(self, round_id: int, status: str, finished: float, summary: dict) -> None:
        self.db.execute(
            "UPDATE rounds SET status=?, finished=?, summary=? WHERE round_id=?",
            (status, finished, json.dumps(summary), round_id),
        )

    def seen_update(self, device_id: str, update_id: str) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM answers WHERE device_id=? AND update_id=?", (device_id, update_id)
        ).fetchone()
        return row is not None

    def record_answer(
        self,
        *,
        device_id: str,
        update_id: str,
        round_id: int,
        kind: str,
        num_samples: int,
        trained: bool,
        train_loss: float | None,
        nbytes: int,
        received: float,
        delta: dict[str, np.ndarray] | None,
        wire: int | None = None,
    ) -> None:
        """Keep an accepted update (with its decoded delta) or skip notice of the open round."""
        self.db.execute(
            "INSERT INTO answers(device_id, update_id, round_id, kind, num_samples, trained,"
            " train_loss, nbytes, received, delta, wire) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                device_id,
                update_id,
                round_id,
                kind,
                num_samples,
                int(trained),
                train_loss,
                nbytes,
                received,
                None if delta is None else _pack(delta),
                wire,
            ),
        )

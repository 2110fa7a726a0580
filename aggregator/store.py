"""The aggregator's memory: rounds, updates and global models in SQLite (WAL).

A restart resumes from the newest global model; a round that was open when the
process died is marked abandoned and a new one is announced.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    version   INTEGER PRIMARY KEY,
    round_id  INTEGER NOT NULL,
    created   REAL NOT NULL,
    weights   BLOB NOT NULL          -- np.savez of the float32 tensors
);
CREATE TABLE IF NOT EXISTS strategy_state (
    version   INTEGER PRIMARY KEY,   -- the model version this state produced
    state     BLOB NOT NULL          -- np.savez of the strategy's arrays (momentum, moments)
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
CREATE TABLE IF NOT EXISTS updates (
    update_id   TEXT PRIMARY KEY,
    round_id    INTEGER NOT NULL,
    device_id   TEXT NOT NULL,
    kind        TEXT NOT NULL,        -- update | skip
    num_samples INTEGER,
    accepted    INTEGER NOT NULL,
    reason      TEXT,
    nbytes      INTEGER NOT NULL,
    received    REAL NOT NULL
);
"""


class StoreError(RuntimeError):
    """SQLite failed; the message names the database file."""


def _pack(weights: dict[str, np.ndarray]) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **weights)  # type: ignore[arg-type]  # numpy stubs mistype **kwds
    return buf.getvalue()


def _unpack(blob: bytes) -> dict[str, np.ndarray]:
    import io

    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # One loop owns the store, but it may be built in another thread than the
            # one that runs it (fedge sim, tests): never used from two threads at once.
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: {exc}") from exc

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
        row = self.db.execute("SELECT MAX(round_id) FROM rounds").fetchone()
        return int(row[0] or 0)

    def completed_rounds(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM rounds WHERE status='done'").fetchone()[0])

    def abandon_open_rounds(self) -> int:
        cur = self.db.execute(
            "UPDATE rounds SET status='abandoned', finished=? WHERE status='open'", (time.time(),)
        )
        return cur.rowcount

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

    def seen_update(self, update_id: str) -> bool:
        row = self.db.execute("SELECT 1 FROM updates WHERE update_id=?", (update_id,)).fetchone()
        return row is not None

    def record_update(
        self,
        *,
        update_id: str,
        round_id: int,
        device_id: str,
        kind: str,
        num_samples: int | None,
        accepted: bool,
        reason: str | None,
        nbytes: int,
        received: float,
    ) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO updates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                update_id,
                round_id,
                device_id,
                kind,
                num_samples,
                int(accepted),
                reason,
                nbytes,
                received,
            ),
        )

"""The device's own sensor as its training data: serial port -> decoder -> SQLite -> examples.

A reader thread owns the port and the writing side of the store (a SQLite connection stays
in the thread that made it); the agent's loop opens its own reading connection (WAL lets
both work at once) and, when a round starts, turns the latest samples into examples with
the configured task. The samples never leave the device.

The reader hands samples over in batches of up to half a second (``SerialReader``), one store
transaction each, so a killed agent loses at most the last half second or so of samples; the
store enforces its bounds about every ``ENFORCE_S`` seconds of batches. A batch the store
cannot take (a full disk, a broken database) is lost, counted (``store_failed``) and logged;
the port is still read, and the next batch tries again.

Samples with a NaN or infinite value never reach the store (it drops and counts them:
:attr:`counters`), and the examples of every round are checked against the model
(:mod:`fedge.models.checks`): windows that do not fit it are not trained on, and the round
is sat out with the reason logged once at WARNING.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fedge.firmware_bridge.binary_frames import BinaryDecoder
from fedge.firmware_bridge.reader import SerialReader
from fedge.firmware_bridge.text_frames import TextDecoder
from fedge.models.checks import DataError, ModelIO, check_data

from . import tasks
from .config import SerialConfig, TaskConfig
from .dataset import Dataset
from .store import SampleStore, StoreError

log = logging.getLogger("fedge.agent")

ENFORCE_S = 1.0  # seconds of reader batches between the store's bound enforcements


class SensorSource:
    def __init__(
        self,
        serial: SerialConfig,
        task: TaskConfig,
        store_path: Path,
        *,
        model: ModelIO | None = None,
    ) -> None:
        self.serial = serial
        self.task = task
        self.store_path = store_path
        self.model = model  # what the examples must fit; None: not checked
        self._misfit = False  # the last examples did not fit the model (and that was logged)
        self.decoder: Any = (
            BinaryDecoder() if serial.format == "binary" else TextDecoder(serial.channels)
        )
        self.reader = SerialReader(
            serial.port, serial.baudrate, self.decoder, on_samples=self._write
        )
        self._writer: SampleStore | None = None
        self._reading: SampleStore | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store_failed = 0  # samples the store could not take
        self._store_errors = 0

    # -- the reader thread --------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="serial-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.reader.run(self._stop)
        finally:
            if self._writer is not None:
                self._writer.close()

    def _write(self, samples: Sequence[Any]) -> None:
        try:
            if self._writer is None:
                self._writer = self._open()
            self._writer.append(samples)
        except StoreError as exc:  # must not end the reader: the next batch tries again
            self._store_failed += len(samples)
            self._store_errors += 1
            if self._store_errors == 1 or self._store_errors % 100 == 0:
                log.error(
                    "%s; %d samples not stored so far (%d batches)",
                    exc,
                    self._store_failed,
                    self._store_errors,
                )

    @property
    def counters(self) -> dict[str, int]:
        """What the serial path saw: bytes, samples, port faults, frame faults by kind, and
        ``non_finite_dropped`` (samples with a NaN or inf value, never stored) and
        ``store_failed`` (samples the store could not take)."""
        counts = dict(self.reader.counters) | dict(self.decoder.faults)
        counts["store_failed"] = self._store_failed
        writer = self._writer
        counts["non_finite_dropped"] = 0 if writer is None else writer.non_finite_dropped
        return counts

    @property
    def store_bytes(self) -> int:
        """The sample store's size on disk (the database and its write-ahead log)."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):  # not written yet
                total += os.stat(f"{self.store_path}{suffix}").st_size
        return total

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._reading is not None:
            self._reading.close()
            self._reading = None

    # -- the agent's loop -----------------------------------------------------------
    def _open(self) -> SampleStore:
        return SampleStore(
            self.store_path,
            max_rows=self.serial.max_rows,
            max_bytes=self.serial.max_bytes,
            retention_s=self.serial.retention_s,
            enforce_every=max(1, round(ENFORCE_S / self.reader.flush_every)),
        )

    def scaled(self, values: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.asarray(values, np.float32)
        if self.task.center is not None:
            out = out - np.asarray(self.task.center, np.float32)
        if self.task.scale is not None:
            out = out / np.asarray(self.task.scale, np.float32)
        return out.astype(np.float32)

    def _store(self) -> SampleStore:
        if self._reading is None:
            if not self.store_path.exists():
                raise tasks.TaskError("no samples yet")
            self._reading = self._open()
        return self._reading

    def anomaly_score(self, runtime: Any) -> float | None:
        """For ``autoencode``: the reconstruction error of the latest window (None otherwise).

        A window the fleet's model cannot reconstruct looks unlike what the machines usually
        do; the score rises as a machine drifts away from the fleet's normal.
        """
        if self.task.kind != "autoencode":
            return None
        try:
            raw = self._store().latest(self.task.window)
        except tasks.TaskError:
            return None
        if len(raw) < self.task.window:
            return None
        x, _ = tasks.autoencode(self.scaled(raw), self.task.window)
        return float(tasks.reconstruction_error(runtime.infer(x), x)[-1])

    def dataset(self) -> Dataset:
        """Examples from the latest samples; :class:`tasks.TaskError` when too few."""
        store = self._store()
        labels = None
        if self.task.kind == "classify":  # the stream's label channel (text lines: label=3)
            raw, labels = store.latest_labelled(self.task.history)
        else:
            raw = store.latest(self.task.history)
        if raw.size == 0:
            raise tasks.TaskError("no samples yet")
        finite = np.isfinite(raw).all(axis=1)  # a store written before they were dropped
        if not finite.all():
            raw = raw[finite]
            labels = None if labels is None else labels[finite]
        values = self.scaled(raw)
        x, y = tasks.examples(
            self.task.kind,
            values,
            self.task.window,
            labels=labels,
            targets=self.task.targets,
            horizon=self.task.horizon,
        )
        if len(x) < self.task.min_examples:
            raise tasks.TaskError(f"{len(x)} examples, want at least {self.task.min_examples}")
        if self.model is None:
            return Dataset(x, y)
        return Dataset(*self._fit(x, y))

    def _fit(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        name = f"{self.serial.port} ({self.task.kind}, window {self.task.window})"
        assert self.model is not None
        try:
            fitted = check_data(self.model, x, y, name=name)
        except DataError as exc:
            if not self._misfit:  # once until they fit again, not every round
                log.warning("sensor examples do not fit the model: %s", exc)
            self._misfit = True
            raise tasks.TaskError(str(exc)) from exc
        self._misfit = False
        return fitted

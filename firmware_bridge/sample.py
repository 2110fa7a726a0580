"""``Sample``: one reading of one sensor; ``SampleBatch``: many, as columns.

The framing layer does not judge values: NaN and infinities pass through as the firmware sent
them (the store and the task decide what to do with them). Bounds that a wire format imposes
(u8 sensor id, u16 sequence number, u32 timestamp, at most 32 float32 channels in a binary
frame) are checked by that format's encoder, not here.

The text decoder hands over a list of ``Sample``. The binary decoder hands over a
``SampleBatch``: the same samples as numpy columns, so that thousands of frames a second cost
no Python object each. A batch is a sequence of ``Sample`` too (indexing builds one), for
callers and tests that want them; the store reads the columns.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any, overload

import numpy as np


@dataclass(frozen=True)
class Sample:
    """One reading.

    Attributes:
        sensor_id: which sensor (or MCU) produced it; text lines without ``id=`` get the
            decoder's default.
        seq: the firmware's frame counter, or None when the format carried none (CSV lines).
            Binary frames carry a u16 that wraps.
        timestamp_ms: the MCU's clock in milliseconds (``millis()``), or None when not sent.
            It is the MCU's clock, not wall time; binary frames carry a u32 that wraps.
        values: the channel readings, in channel order.
        label: an optional class label sent by the firmware (text lines: ``label=3``).
    """

    sensor_id: int
    seq: int | None
    timestamp_ms: int | None
    values: tuple[float, ...]
    label: int | None = None


class SampleBatch(Sequence[Sample]):
    """Samples in arrival order as columns; every one has a seq and a timestamp, no label.

    Attributes (``k`` samples):
        sensor_id, seq, timestamp_ms: int64 ``(k,)``.
        values: float32 ``(k, width)``; row ``i`` holds ``channels[i]`` readings, then zeros
            up to ``width`` (the most channels of any sample in the batch).
        channels: int64 ``(k,)``, how many readings each sample has.
    """

    __slots__ = ("channels", "sensor_id", "seq", "timestamp_ms", "values")

    def __init__(
        self,
        sensor_id: np.ndarray,
        seq: np.ndarray,
        timestamp_ms: np.ndarray,
        values: np.ndarray,
        channels: np.ndarray,
    ) -> None:
        k = len(sensor_id)
        if values.ndim != 2 or values.dtype != np.float32:
            raise ValueError(
                f"values must be float32 (k, width), got {values.dtype} {values.shape}"
            )
        if not len(seq) == len(timestamp_ms) == len(values) == len(channels) == k:
            raise ValueError("columns of different lengths")
        self.sensor_id = np.asarray(sensor_id, np.int64)
        self.seq = np.asarray(seq, np.int64)
        self.timestamp_ms = np.asarray(timestamp_ms, np.int64)
        self.values = values
        self.channels = np.asarray(channels, np.int64)

    @classmethod
    def empty(cls) -> SampleBatch:
        none = np.empty(0, np.int64)
        return cls(none, none, none, np.empty((0, 0), np.float32), none)

    @classmethod
    def concat(cls, batches: Sequence[SampleBatch]) -> SampleBatch:
        """One batch of all ``batches`` in order (narrow values padded with zeros)."""
        if len(batches) == 1:
            return batches[0]
        if not batches:
            return cls.empty()
        width = max(b.values.shape[1] for b in batches)
        values = np.zeros((sum(len(b) for b in batches), width), np.float32)
        row = 0
        for b in batches:
            values[row : row + len(b), : b.values.shape[1]] = b.values
            row += len(b)
        return cls(
            np.concatenate([b.sensor_id for b in batches]),
            np.concatenate([b.seq for b in batches]),
            np.concatenate([b.timestamp_ms for b in batches]),
            values,
            np.concatenate([b.channels for b in batches]),
        )

    def __len__(self) -> int:
        return len(self.sensor_id)

    @overload
    def __getitem__(self, index: int) -> Sample: ...
    @overload
    def __getitem__(self, index: slice | np.ndarray) -> SampleBatch: ...
    def __getitem__(self, index: int | slice | np.ndarray) -> Sample | SampleBatch:
        """One sample; or the rows a slice, a boolean mask or an index array picks."""
        if isinstance(index, (slice, np.ndarray)):
            return SampleBatch(
                self.sensor_id[index],
                self.seq[index],
                self.timestamp_ms[index],
                self.values[index],
                self.channels[index],
            )
        i = range(len(self))[index]  # bounds and negative indices as for a list
        return Sample(
            int(self.sensor_id[i]),
            int(self.seq[i]),
            int(self.timestamp_ms[i]),
            tuple(self.values[i, : self.channels[i]].tolist()),
        )

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        """Equal to a list, tuple or batch of the same samples (NaN is unequal, as in a list)."""
        if not isinstance(other, (SampleBatch, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside, like a list

    def __repr__(self) -> str:
        return f"SampleBatch({len(self)} samples)"


def join_samples(parts: Iterable[Sequence[Any]]) -> Sequence[Any]:
    """The samples of ``parts`` in order, as one batch if they all are batches, else a list."""
    parts = list(parts)
    batches = [p for p in parts if isinstance(p, SampleBatch)]
    if len(batches) == len(parts):
        return SampleBatch.concat(batches)
    return list(chain.from_iterable(parts))

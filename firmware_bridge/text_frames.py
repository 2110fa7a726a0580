"""Text sensor lines, as an Arduino sketch prints them with ``Serial.println``.

One line is one sample, ended by ``\\n`` (a ``\\r`` before it is dropped). Two forms:

CSV (no ``=`` in the line): values only, separated by commas, or by spaces/tabs when the
line has no comma (the Arduino Serial Plotter form)::

    12.5,3.1,0.2
    12.5 3.1 0.2

key=value pairs, separated by spaces and/or commas::

    t=1234 ax=0.1 ay=0.2 temp=31.5
    id=2,seq=17,t=1234,ax=0.1,ay=0.2,label=1

The keys ``id`` (sensor id), ``seq`` (frame counter), ``t`` (timestamp, ms) and ``label``
are metadata and must be non-negative decimal integers; every other key is a channel. With
``channels`` given, ``values`` follow that order, a missing channel drops the line, and
keys not listed are ignored; without ``channels``, values are in the order of the line.
Numbers are whatever Python's ``float`` accepts in ASCII, so ``nan`` and ``inf`` (which
Arduino prints) pass through; the framing layer does not judge values.

``TextDecoder.feed`` takes bytes as they arrive (split anywhere) and returns the samples of
the lines they complete. It never raises on bad input; it drops the line and counts why in
``faults``::

    line_too_long      more than ``max_line`` bytes before the ``\\n`` (a ``\\r`` counts);
                       counted once, the rest of the line is skipped
    not_utf8           the line is not UTF-8
    not_numeric        a value that is not a number, an id/seq/t/label that is not a
                       non-negative integer, or non-ASCII text
    bad_pair           a key=value line with a token that is not ``key=value``
    duplicate_key      the same key twice in a line
    missing_channel    a key of ``channels`` absent from a key=value line
    wrong_field_count  a CSV line whose field count is not ``len(channels)``
    no_values          a key=value line with metadata only
    duplicate, seq_gap, seq_reset
                       from ``seq=`` as in ``sequence.py`` (counter modulo ``seq_modulus``,
                       2**32 by default: Arduino's ``unsigned long``)

Blank lines are skipped without a fault. A line still unterminated stays buffered.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from .faults import record
from .sample import Sample
from .sequence import SeqTracker
from .splitter import Splitter

META_KEYS = ("id", "seq", "t", "label")
DEFAULT_MAX_LINE = 512
_KV_SPLIT = re.compile(r"[,\s]+")
_WS_SPLIT = re.compile(r"\s+")


class _LineFault(Exception):
    """A line rejected for ``kind``; never leaves this module."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _LineFault("not_numeric") from None


def _natural(text: str) -> int:
    if not text.isdigit():  # the line is ASCII here, so this means [0-9]+
        raise _LineFault("not_numeric")
    return int(text)


class TextDecoder:
    """Streaming decoder of text lines; see the module docstring for the forms and faults."""

    def __init__(
        self,
        channels: Sequence[str] | None = None,
        max_line: int = DEFAULT_MAX_LINE,
        *,
        sensor_id: int = 0,
        seq_modulus: int = 1 << 32,
    ) -> None:
        if channels is not None:
            channels = tuple(channels)
            bad = [c for c in channels if c in META_KEYS or not c or "=" in c or c != c.strip()]
            if bad or len(set(channels)) != len(channels):
                raise ValueError(f"channel names must be unique, non-metadata keys: {channels}")
        if max_line < 1:
            raise ValueError(f"max_line must be >= 1, got {max_line}")
        self.channels: tuple[str, ...] | None = channels
        self.max_line = max_line
        self.sensor_id = sensor_id
        self.faults: Counter[str] = Counter()
        self.lines = 0  # lines decoded into samples (duplicates included)
        self.seq = SeqTracker(seq_modulus)
        self._records = Splitter(b"\n", max_line, lambda: self._fault("line_too_long"))

    def feed(self, data: bytes) -> list[Sample]:
        """Take the next bytes of the stream; return the samples of the lines completed."""
        out: list[Sample] = []
        for line in self._records.feed(data):
            self._line(line, out)
        return out

    def reset(self) -> None:
        """Drop any partial line (after a reconnect); sequence tracking starts afresh."""
        self._records.reset()
        self.seq.forget()

    def _fault(self, kind: str, n: int = 1) -> None:
        record(self.faults, kind, n, source="text lines")

    def _line(self, raw: bytes, out: list[Sample]) -> None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._fault("not_utf8")
            return
        text = text.strip()
        if not text:
            return
        try:
            if not text.isascii():
                raise _LineFault("not_numeric")
            sample = self._parse_kv(text) if "=" in text else self._parse_csv(text)
        except _LineFault as fault:
            self._fault(fault.kind)
            return
        self.lines += 1
        if sample.seq is not None:
            verdict, missed = self.seq.check(sample.sensor_id, sample.seq)
            if verdict == "duplicate":
                self._fault("duplicate")
                return
            if verdict == "gap":
                self._fault("seq_gap", missed)
            elif verdict == "reset":
                self._fault("seq_reset")
        out.append(sample)

    def _parse_csv(self, text: str) -> Sample:
        fields = text.split(",") if "," in text else _WS_SPLIT.split(text)
        if self.channels is not None and len(fields) != len(self.channels):
            raise _LineFault("wrong_field_count")
        values = tuple(_number(f) for f in fields)
        return Sample(self.sensor_id, None, None, values)

    def _parse_kv(self, text: str) -> Sample:
        pairs: dict[str, str] = {}
        for token in _KV_SPLIT.split(text):
            key, sep, value = token.partition("=")
            if not sep or not key or not value:
                raise _LineFault("bad_pair")
            if key in pairs:
                raise _LineFault("duplicate_key")
            pairs[key] = value
        meta = {k: _natural(pairs.pop(k)) for k in META_KEYS if k in pairs}
        if self.channels is None:
            values = tuple(_number(v) for v in pairs.values())
        else:
            try:
                values = tuple(_number(pairs[c]) for c in self.channels)
            except KeyError:
                raise _LineFault("missing_channel") from None
        if not values:
            raise _LineFault("no_values")
        return Sample(
            meta.get("id", self.sensor_id),
            meta.get("seq"),
            meta.get("t"),
            values,
            meta.get("label"),
        )


def format_line(sample: Sample, channels: Sequence[str] | None = None) -> bytes:
    """``sample`` as a key=value line ending in ``\\r\\n`` (what ``TextDecoder`` reads back).

    Channels are named ``channels`` (default ``v0``, ``v1``, ...); values use ``repr`` so they
    decode to the same float (NaN as ``nan``, without its payload). A sample without values
    makes a line the decoder rejects (``no_values``). For simulators and tests; firmware
    prints its own lines.
    """
    names = (
        tuple(channels)
        if channels is not None
        else tuple(f"v{i}" for i in range(len(sample.values)))
    )
    if len(names) != len(sample.values):
        raise ValueError(f"{len(sample.values)} values but {len(names)} channel names")
    parts = [f"id={sample.sensor_id}"]
    if sample.seq is not None:
        parts.append(f"seq={sample.seq}")
    if sample.timestamp_ms is not None:
        parts.append(f"t={sample.timestamp_ms}")
    if sample.label is not None:
        parts.append(f"label={sample.label}")
    parts += [f"{name}={float(v)!r}" for name, v in zip(names, sample.values, strict=True)]
    return (" ".join(parts) + "\r\n").encode("ascii")

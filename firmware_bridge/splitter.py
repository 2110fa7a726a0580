"""Cut a byte stream into records at a delimiter, with a bound on a record's length.

Shared by the binary decoder (0x00 after each COBS frame) and the text decoder (newline).
A record longer than ``max_len`` is dropped whole, once reported through ``on_overflow``,
and the stream resynchronises at the next delimiter. Records may arrive split across
:meth:`Splitter.feed` calls at any byte.
"""

from __future__ import annotations

from collections.abc import Callable


class Splitter:
    def __init__(self, delimiter: bytes, max_len: int, on_overflow: Callable[[], None]) -> None:
        self.delimiter = delimiter
        self.max_len = max_len
        self.on_overflow = on_overflow
        self._buf = bytearray()
        self._skipping = False  # inside an overlong record, waiting for its delimiter

    def reset(self) -> None:
        self._buf.clear()
        self._skipping = False

    def feed(self, data: bytes) -> list[bytes]:
        """The records the new bytes complete (empty records included, in order)."""
        out: list[bytes] = []
        start = 0
        find = data.find
        while True:
            end = find(self.delimiter, start)
            if end < 0:
                if not self._skipping:
                    self._buf += data[start:]
                    if len(self._buf) > self.max_len:
                        self.on_overflow()
                        self._buf.clear()
                        self._skipping = True
                return out
            if self._skipping:
                self._skipping = False
            else:
                if self._buf:
                    self._buf += data[start:end]
                    record = bytes(self._buf)
                    self._buf.clear()
                else:
                    record = data[start:end]
                if len(record) > self.max_len:
                    self.on_overflow()
                else:
                    out.append(record)
            start = end + 1

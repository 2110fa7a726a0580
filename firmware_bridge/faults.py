"""Fault counting shared by the framing decoders.

Decoders never raise on bad input: each rejected frame or line adds to a ``Counter`` under a
short reason (``bad_crc``, ``line_too_long``, ...). The first fault of each kind is logged
once per decoder, so a headless device says what is wrong without flooding the journal.
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("fedge.firmware_bridge")


def record(faults: Counter[str], kind: str, n: int = 1, *, source: str = "decoder") -> None:
    """Add ``n`` faults of ``kind``; log the first one of each kind."""
    if kind not in faults:
        log.warning("%s: first %s fault (later ones are only counted)", source, kind)
    faults[kind] += n

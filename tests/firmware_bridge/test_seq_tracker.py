"""Sequence tracking: in order, gaps, duplicates, wrap-around and restarts, per sensor."""

from __future__ import annotations

import pytest
from fedge.firmware_bridge.sequence import SeqTracker

pytestmark = pytest.mark.unit


def test_verdicts() -> None:
    t = SeqTracker(1 << 16)
    assert t.check(1, 10) == ("first", 0)
    assert t.check(1, 11) == ("ok", 0)
    assert t.check(1, 11) == ("duplicate", 0)
    assert t.check(1, 15) == ("gap", 3)
    assert t.check(2, 0) == ("first", 0)  # sensors are independent
    assert t.check(1, 3) == ("reset", 0)  # backwards: MCU restarted
    assert t.check(1, 4) == ("ok", 0)


def test_wrap() -> None:
    t = SeqTracker(1 << 16)
    t.check(0, 65534)
    assert t.check(0, 65535) == ("ok", 0)
    assert t.check(0, 0) == ("ok", 0)
    t.check(0, 65533)  # "reset" backwards
    assert t.check(0, 2) == ("gap", 4)  # 65534, 65535, 0, 1 missed


def test_forget() -> None:
    t = SeqTracker()
    t.check(0, 5)
    t.forget(0)
    assert t.check(0, 100) == ("first", 0)

"""What the aggregator keeps for quiet devices (aggregator/inbox.py): which devices a round
may select while some rest, and what brings a device that is behind up to date."""

from __future__ import annotations

import pytest
from fedge.aggregator.inbox import MAX_CHAIN, Inboxes
from fedge.protocol import MemoryBroker, MemoryLink, Topics

pytestmark = pytest.mark.unit


def inboxes() -> Inboxes:
    link = MemoryLink(MemoryBroker(), "aggregator")
    link.connect()
    return Inboxes(Topics("f"), link)


def whole() -> bytes:
    return b"W" * 1000


def test_resting_devices_are_left_out_until_their_rest_is_over() -> None:
    box = inboxes()
    for d in "abc":
        box.note_status(d, True, 0)
    box.note_rest("a", round_id=4, rest=2)  # rests in rounds 5 and 6
    box.note_rest("b", round_id=4, rest=1)
    assert box.selectable(5, "abc", 1) == ["c"]
    assert box.selectable(6, "abc", 1) == ["b", "c"]
    assert box.selectable(7, "abc", 1) == ["a", "b", "c"]


def test_when_everyone_rests_the_rest_that_ends_first_is_cut_short() -> None:
    box = inboxes()
    for d in "abc":
        box.note_status(d, True, 0)
    box.note_rest("a", 1, 5)
    box.note_rest("b", 1, 3)
    box.note_rest("c", 1, 3)
    assert box.selectable(2, "abc", 1) == ["b"]  # ends at 4, first by name among equals
    assert box.resting(2, "abc") == {"a", "c"}


def test_only_a_quiet_device_can_rest() -> None:
    box = inboxes()
    box.note_status("loud", False, 0)
    box.note_rest("loud", 1, 5)
    assert box.selectable(2, ["loud"], 1) == ["loud"]
    box.note_status("q", True, 0)
    box.note_rest("q", 1, 5)
    box.note_status("q", False, 0)  # it listens to every round again: no rest left
    assert box.selectable(2, ["q"], 1) == ["q"]


def test_a_quiet_device_listens_until_a_status_says_otherwise() -> None:
    """A status that says nothing of it (the birth message) keeps what was known; a device
    that is not quiet listens to every round anyway."""
    box = inboxes()
    box.note_status("q", True, 0, listening=True)
    box.note_status("q", True, None)  # the birth message after a reconnect
    assert box.listening == {"q"}
    box.note_status("q", True, 0, listening=False)  # its inbox works
    assert box.listening == set()
    box.note_status("q", True, 0, listening=True)  # restarted
    box.note_status("q", False, 0, listening=True)  # no longer quiet
    assert box.listening == set() and box.quiet == set()


def test_catch_up_is_the_chain_of_deltas_or_the_whole_model() -> None:
    box = inboxes()
    box.note_status("a", True, 2)
    for v in range(1, 6):
        box.model_published(v, bytes([v]) * 100)
    assert box.catch_up("a", 5, whole) == [bytes([3]) * 100, bytes([4]) * 100, bytes([5]) * 100]
    box.note_status("a", True, -1)  # nothing yet: the whole model
    assert box.catch_up("a", 5, whole) == [whole()]
    box.note_status("a", True, 5)
    assert box.catch_up("a", 5, whole) == []
    # A chain larger than the whole model: the whole model.
    box.note_status("a", True, 0)
    for v in range(6, 12):
        box.model_published(v, bytes([v]) * 300)
    assert box.catch_up("a", 11, whole) == [whole()]


def test_a_whole_model_breaks_the_chain() -> None:
    box = inboxes()
    box.note_status("a", True, 3)
    box.model_published(4, b"d4")
    box.model_published(4, None)  # v4 sent whole again (its bits may differ)
    box.model_published(5, b"d5")
    # a holds v3: the delta to v4 it would need is gone, and its v4 would not be the new one.
    assert box.catch_up("a", 5, whole) == [whole()]
    box.note_status("a", True, 5)
    box.model_published(5, None)  # v5 again, whole: a's v5 may be the bits of before
    assert box.held["a"] == 4
    assert box.catch_up("a", 5, whole) == [whole()]


def test_the_chain_keeps_the_newest_deltas() -> None:
    box = inboxes()
    for v in range(1, MAX_CHAIN + 10):
        box.model_published(v, b"x")
    box.note_status("a", True, 1)  # behind by more than is kept
    assert box.catch_up("a", MAX_CHAIN + 9, whole) == [whole()]


def test_deliver_sends_the_catch_up_then_the_round() -> None:
    broker = MemoryBroker()
    link = MemoryLink(broker, "aggregator")
    link.connect()
    device = MemoryLink(broker, "a")
    device.connect()
    device.subscribe(Topics("f").inbox("a"))
    box = Inboxes(Topics("f"), link)
    box.note_status("a", True, 0)
    box.model_published(1, b"delta1")
    sent = box.deliver("a", b"round", 1, whole)
    got = [device.get(0), device.get(0), device.get(0)]
    assert [m.payload for m in got if m is not None] == [b"delta1", b"round"]
    assert box.held["a"] == 1 and sent > len(b"delta1round")

"""Quiet devices that still listen to every round (``Status.listening``: their inbox has
brought nothing yet): every round comes to their inbox as well, and the round records count
them as listening, not asleep. Agents that do not say it (before the field) are quiet as
before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fedge.protocol import MemoryBroker, Message, RoundAnnouncement, Status, decode
from fedge.protocol.status import encode_status
from test_coordinator import (  # noqa: F401
    STORES,
    Clock,
    Device,
    T,
    close_stores,
    delta,
    make,
    pump,
)

pytestmark = pytest.mark.link


def quiet(broker: MemoryBroker, device: str, *, listening: bool | None) -> Device:
    """A quiet device: it hears only its inbox. ``listening`` None: an agent from before
    the field, whose statuses do not say it."""
    d = Device(broker, device)
    d.link.unsubscribe(T.round)
    d.link.unsubscribe(T.global_model)
    heard(d)
    d.link.subscribe(T.inbox(device))
    say(d, listening=listening)
    return d


def say(d: Device, *, listening: bool | None, at: float = 1.0, state: str = "idle") -> None:
    status = Status(
        device_id=d.id,
        state=state,  # type: ignore[arg-type]
        timestamp=at,
        model_version=0,
        quiet=True,
        **({} if listening is None else {"listening": listening}),
    )
    d.link.publish(T.status(d.id), encode_status(status), retain=True)


def heard(d: Device) -> list[Message]:
    out = []
    while (msg := d.link.get(0)) is not None:
        out.append(msg)
    return out


def rounds(messages: list[Message]) -> list[int]:
    """The round ids of the announcements among ``messages``."""
    found = [decode(m.payload).msg for m in messages]
    return [m.round_id for m in found if isinstance(m, RoundAnnouncement)]


def records(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]


def test_a_quiet_device_still_listening_gets_every_round_and_counts_as_listening(
    tmp_path: Path,
) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=4, devices_per_round=1, overselect=1.0)
    devices = {
        "a": Device(broker, "a"),  # not quiet: hears every round anyway
        "new": quiet(broker, "new", listening=True),
        "old": quiet(broker, "old", listening=None),  # an agent from before the field
        "proven": quiet(broker, "proven", listening=False),
    }
    pump(agg)
    for round_id in (1, 2, 3):
        rnd = agg.current
        assert rnd is not None and rnd.round_id == round_id
        (picked,) = rnd.selected
        # The one still listening gets the round in its inbox, selected or not (just the
        # announcement: the models it hears on their broadcast topics); the others only
        # when selected.
        for name in ("new", "old", "proven"):
            got = rounds(heard(devices[name]))
            assert got == ([round_id] if name in ("new", picked) else []), name
        devices[picked].send(round_id, delta(1.0), 10, base=round_id - 1)
        pump(agg)
        pump(agg)
    lines = records(tmp_path)
    assert len(lines) == 3
    for r in lines:
        idle = set(devices) - set(r["participants"])
        assert r["listening"] == len(idle & {"a", "new"}), r
        assert r["sleeping"] == len(idle & {"old", "proven"}), r


def test_a_status_that_says_listening_gets_the_open_round_at_once(tmp_path: Path) -> None:
    """A device that (re)starts during a round listens to it: it gets the round in its
    inbox at once, once, and the record counts it listening even if the announcement
    counted it asleep. The birth message, which says nothing of it, changes nothing."""
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=2, devices_per_round=1, overselect=1.0)
    devices = {d: quiet(broker, d, listening=False) for d in ("p", "q")}
    pump(agg)
    rnd = agg.current
    assert rnd is not None
    (picked,) = rnd.selected
    (other,) = set(devices) - {picked}
    d = devices[other]
    assert heard(d) == [] and (rnd.listening, rnd.sleeping) == (0, 1)
    say(d, listening=True, at=2.0)  # restarted: listens until its inbox brings something
    pump(agg)
    assert rounds(heard(d)) == [1]
    say(d, listening=True, at=3.0, state="training")  # (a status says it again)
    birth = Status(device_id=other, state="online", timestamp=0.0, quiet=True)  # Agent.birth
    d.link.publish(T.status(other), encode_status(birth), retain=True)
    pump(agg)
    assert heard(d) == [] and other in agg.inboxes.listening
    devices[picked].send(1, delta(1.0), 10)
    pump(agg)
    pump(agg)
    (r,) = records(tmp_path)
    assert (r["listening"], r["sleeping"]) == (1, 0)
    say(d, listening=False, at=4.0)  # its inbox works
    pump(agg)
    assert other not in agg.inboxes.listening

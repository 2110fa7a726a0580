"""Devices that ask for the model (``Status.wants_model``): what they get, how often, and
what the round records count of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fedge.protocol import GlobalModelHeader, MemoryBroker, Message, Status, decode, encode
from fedge.protocol.wire import PUBACK_SIZE, publish_size
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


def quiet(broker: MemoryBroker, device: str) -> Device:
    """A quiet device: it hears only its inbox."""
    d = Device(broker, device)
    d.link.unsubscribe(T.round)
    d.link.unsubscribe(T.global_model)
    while d.link.get(0) is not None:
        pass
    d.link.subscribe(T.inbox(device))
    say(d, have=0, quiet=True)
    return d


def say(d: Device, *, have: int, quiet: bool, wants: bool = False, state: str = "idle") -> None:
    status = Status(
        device_id=d.id,
        state=state,  # type: ignore[arg-type]
        timestamp=0.0,
        model_version=have,
        wants_model=wants,
        quiet=quiet,
    )
    d.link.publish(T.status(d.id), encode(status), retain=True)


def heard(d: Device) -> list[Message]:
    out = []
    while (msg := d.link.get(0)) is not None:
        out.append(msg)
    return out


def models(messages: list[Message]) -> list[int]:
    """The versions of the whole models among ``messages``."""
    found = [decode(m.payload).msg for m in messages]
    return [m.model_version for m in found if isinstance(m, GlobalModelHeader)]


def test_a_quiet_device_that_keeps_asking_gets_the_model_once_an_interval(
    tmp_path: Path,
) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=1, republish_interval=5.0)
    q, r = quiet(broker, "q"), quiet(broker, "r")
    say(q, have=-1, quiet=True, wants=True, state="offline")  # asleep: in no round
    say(r, have=-1, quiet=True, wants=True, state="offline")
    pump(agg)
    assert agg.current is None
    for d in (q, r):
        say(d, have=-1, quiet=True, wants=True)
        say(d, have=-1, quiet=True, wants=True, state="offline")
    pump(agg)
    assert models(heard(q)) == [0] and models(heard(r)) == [0]  # each its own
    for _ in range(3):  # asks with every status
        say(q, have=-1, quiet=True, wants=True)
        say(q, have=-1, quiet=True, wants=True, state="offline")
        pump(agg)
    assert models(heard(q)) == []
    clock.now += 6
    say(q, have=-1, quiet=True, wants=True)
    say(q, have=-1, quiet=True, wants=True, state="offline")
    pump(agg)
    assert models(heard(q)) == [0]
    # A newer model goes at once.
    a = Device(broker, "a")
    pump(agg)
    a.send(1, delta(1.0), 10)
    pump(agg)
    assert agg.version == 1
    say(q, have=0, quiet=True, wants=True)
    say(q, have=0, quiet=True, wants=True, state="offline")
    pump(agg)
    assert models(heard(q)) == [1]


def test_a_model_sent_again_during_a_round_counts_in_its_bytes_down(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=2)
    a, q = Device(broker, "a"), quiet(broker, "q")
    pump(agg)
    assert agg.current is not None and sorted(agg.current.selected) == ["a", "q"]
    # Each lost its model: "a" gets the global again, "q" the whole model in its inbox.
    say(a, have=-1, quiet=False, wants=True)
    say(q, have=-1, quiet=True, wants=True)
    pump(agg)
    got_a, got_q = heard(a), heard(q)  # all that reached them for the round
    a.send(1, delta(1.0), 10)
    q.send(1, delta(1.0), 10)
    pump(agg)
    line = json.loads((tmp_path / "rounds.jsonl").read_text())
    assert models(got_a) == [0, 0] and models(got_q) == [0]  # (a: at subscribe, and again)
    assert line["bytes_down_per_device"] == sum(
        publish_size(m.topic, len(m.payload), 1) + PUBACK_SIZE for m in got_a
    )
    assert line["bytes_down_by_device"] == {
        "q": sum(publish_size(m.topic, len(m.payload), 1) + PUBACK_SIZE for m in got_q)
    }

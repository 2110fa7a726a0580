"""The aggregator's schedule and its memory of who answers, over the in-memory link."""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from fedge.aggregator.coordinator import HISTORY, REVISIT_AFTER, Aggregator
from fedge.aggregator.store import Store
from fedge.protocol import MemoryBroker
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


def answer_all_but(
    agg: Aggregator, clock: Clock, devices: dict[str, Device], *silent: str
) -> list[str]:
    """Play the open round: every selected device answers except ``silent`` ones; the clock
    runs to the deadline if the round waits for them. Returns who was selected."""
    rnd = agg.current
    assert rnd is not None
    for d in rnd.selected:
        if d not in silent:
            devices[d].send(rnd.round_id, delta(0.1), 10, base=agg.version)
    pump(agg)
    if agg.current is rnd:
        clock.now += 11
        pump(agg)
    assert agg.current is not rnd
    return sorted(rnd.selected)


def test_rounds_start_at_the_interval_and_the_wait_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=1, schedule={"interval": 60})
    devices = {"a": Device(broker, "a")}
    pump(agg)
    assert agg.current is not None and agg.current.round_id == 1  # the first at once
    caplog.set_level(logging.INFO, "fedge.aggregator")
    clock.now += 5
    answer_all_but(agg, clock, devices)
    for _ in range(3):
        clock.now += 10
        pump(agg)
    assert agg.current is None
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round 2 at")]
    assert waits == [f"round 2 at {datetime.fromtimestamp(1060.0):%H:%M} (every 60 s)"]
    clock.now = 1060.0
    pump(agg)
    assert agg.current is not None and agg.current.round_id == 2


def test_no_round_outside_the_window(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    berlin = ZoneInfo("Europe/Berlin")
    broker, clock = MemoryBroker(), Clock()
    clock.now = datetime(2026, 12, 1, 14, 0, tzinfo=berlin).timestamp()
    caplog.set_level(logging.INFO, "fedge.aggregator")
    window = {"window": "22:00-06:00", "timezone": "Europe/Berlin"}
    agg = make(tmp_path, broker, clock, min_devices=1, schedule=window)
    notes: list[str] = []
    agg.on_note = notes.append  # the service shows it in `systemctl status`
    devices = {"a": Device(broker, "a")}
    for _ in range(5):
        pump(agg)
        clock.now += 600
    assert agg.current is None
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round 1 at")]
    assert waits == ["round 1 at 22:00 (window 22:00-06:00)"] == notes
    clock.now = datetime(2026, 12, 1, 22, 0, tzinfo=berlin).timestamp()
    pump(agg)
    assert agg.current is not None and agg.current.round_id == 1
    clock.now = datetime(2026, 12, 2, 5, 59, 59, tzinfo=berlin).timestamp()
    answer_all_but(agg, clock, devices)  # round 2 starts at 05:59:59 and may finish after 06:00
    pump(agg)
    rnd = agg.current
    assert rnd is not None and rnd.round_id == 2
    clock.now += 5
    answer_all_but(agg, clock, devices)
    assert agg.completed == 2 and agg.current is None  # and no round 3 until the evening


def test_who_does_not_answer_is_remembered_across_a_restart(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=3)
    devices = {d: Device(broker, d) for d in ("a", "b", "hung")}
    pump(agg)
    for _ in range(2):
        answer_all_but(agg, clock, devices, "hung")
    assert agg.misses_in_a_row("hung") == 2
    agg.store.db.close()  # killed between rounds
    agg = make(tmp_path, broker, clock, min_devices=3)
    pump(agg)
    rnd = agg.current
    assert rnd is not None and rnd.round_id == 3 and "hung" in rnd.selected
    started = clock.now
    answer_all_but(agg, clock, devices, "hung")
    assert clock.now == started  # not waited for: it is still known to miss its rounds


def test_the_outcomes_kept_are_the_last_few_per_device(tmp_path: Path) -> None:
    store = Store(tmp_path / "agg.sqlite")
    STORES.append(store)
    for r in range(1, HISTORY + 5):
        store.record_outcomes(r, {"a": r % 2 == 0, "b": True}, keep=HISTORY)
    kept = store.outcomes()
    assert [r for r, _ in kept["a"]] == list(range(5, HISTORY + 5))
    assert [ok for _, ok in kept["a"]][:2] == [False, True]
    assert len(kept["b"]) == HISTORY


def test_a_state_file_from_before_the_outcomes_table_is_upgraded(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=2)
    devices = {d: Device(broker, d) for d in ("a", "b")}
    pump(agg)
    answer_all_but(agg, clock, devices)
    agg.store.db.execute("DROP TABLE outcomes")  # what the previous version left
    agg.store.db.close()
    agg = make(tmp_path, broker, clock, min_devices=2)
    assert agg.history == {} and agg.completed == 1
    pump(agg)
    answer_all_but(agg, clock, devices, "b")
    assert agg.misses_in_a_row("b") == 1 and agg.store.outcomes()["a"] == [(2, True)]


def test_reliable_devices_first_and_one_that_keeps_missing_is_still_tried(
    tmp_path: Path,
) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=4, devices_per_round=2, overselect=1.5)
    devices = {d: Device(broker, d) for d in ("a", "b", "c", "flaky")}
    pump(agg)
    picks = [answer_all_but(agg, clock, devices, "flaky") for _ in range(30)]
    tried = [r for r, p in enumerate(picks, start=1) if "flaky" in p]
    assert len(tried) >= 3  # not starved
    for r in tried:
        # after a miss it ranks behind the devices that answer, until it sat out a while
        assert not any("flaky" in p for p in picks[r : r + REVISIT_AFTER])
    assert all(len(p) == 3 for p in picks)  # ceil(2 * 1.5)


def test_reliable_devices_take_turns_and_the_rotation_survives_a_restart(
    tmp_path: Path,
) -> None:
    """10 devices, 2 a round, no spares: every device is selected once every 5 rounds (a
    random draw among equals left some out for 10 rounds and more), also across a restart
    of the aggregator, which reads who was selected when from its state."""
    broker, clock = MemoryBroker(), Clock()
    names = [f"d{i}" for i in range(10)]

    def start() -> Aggregator:
        return make(tmp_path, broker, clock, min_devices=10, devices_per_round=2, overselect=1.0)

    agg = start()
    devices = {d: Device(broker, d) for d in names}
    pump(agg)
    picks = [answer_all_but(agg, clock, devices) for _ in range(7)]
    agg.store.db.close()
    agg = start()
    pump(agg)
    picks += [answer_all_but(agg, clock, devices) for _ in range(8)]
    assert all(len(p) == 2 for p in picks)
    for first in range(0, len(picks) - 4):
        window = [d for p in picks[first : first + 5] for d in p]
        assert sorted(window) == names  # each device exactly once in any 5 rounds in a row


def test_a_spare_that_answers_by_the_deadline_of_a_round_closed_without_it_is_no_miss(
    tmp_path: Path,
) -> None:
    """4 devices, 2 a round, 3 selected: the round closes at the first two answers. The
    third answers by the round's deadline: late for the round, but not a device that misses
    rounds (it keeps its rank, in memory and in the store). One that answers after the
    deadline missed it."""
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=4, devices_per_round=2, overselect=1.5)
    devices = {d: Device(broker, d) for d in ("a", "b", "c", "d")}
    pump(agg)
    for late_by in (1.0, 11.0):  # seconds after the round closed; its deadline is at 10
        rnd = agg.current
        assert rnd is not None and len(rnd.selected) == 3
        first, second, spare = sorted(rnd.selected)
        for d in (first, second):
            devices[d].send(rnd.round_id, delta(0.1), 10, base=agg.version)
        pump(agg)
        assert agg.current is not rnd  # closed at its target, without the spare
        assert agg.misses_in_a_row(spare) == 1
        clock.now += late_by
        devices[spare].send(rnd.round_id, delta(0.1), 10, base=agg.version - 1)
        pump(agg)
        assert agg.rejected["wrong_round"] >= 1  # its update does not count, late as it is
        missed = late_by > 10
        assert agg.misses_in_a_row(spare) == int(missed)
        assert dict(agg.store.outcomes()[spare])[rnd.round_id] is not missed
        if agg.current is None:
            clock.now += 1
            pump(agg)


def test_spares_are_credited_by_their_round_deadline_after_later_rounds_and_a_restart(
    tmp_path: Path,
) -> None:
    """6 devices, 2 a round, 3 selected, rounds back to back that close at their target: the
    next round often closes before the deadline of the one before. A spare of round 1 that
    answers by round 1's deadline, after round 2 closed, is no miss; nor is a spare of round
    2 that answers by its deadline after the aggregator restarted."""
    broker, clock = MemoryBroker(), Clock()

    def start() -> Aggregator:
        return make(tmp_path, broker, clock, min_devices=6, devices_per_round=2, overselect=1.5)

    agg = start()
    devices = {d: Device(broker, d) for d in "abcdef"}
    pump(agg)
    spares = {}
    for round_id in (1, 2):
        rnd = agg.current
        assert rnd is not None and rnd.round_id == round_id and len(rnd.selected) == 3
        *first, spares[round_id] = sorted(rnd.selected)
        for d in first:
            devices[d].send(round_id, delta(0.1), 10, base=agg.version)
        pump(agg)  # closed at its target; the next announced at once
        clock.now += 1
    assert agg.misses_in_a_row(spares[1]) == 1 and agg.misses_in_a_row(spares[2]) == 1
    devices[spares[1]].send(1, delta(0.1), 10, base=0)  # 2 s after round 1 started
    pump(agg)
    agg.store.db.close()  # killed
    agg = start()
    devices[spares[2]].send(2, delta(0.1), 10, base=1)
    pump(agg)
    assert agg.rejected["wrong_round"] == 1  # (counted by the restarted one: the second)
    for round_id, spare in spares.items():
        assert dict(agg.history[spare])[round_id] is True
        assert dict(agg.store.outcomes()[spare])[round_id] is True


def test_a_late_skip_notice_declares_its_rest(tmp_path: Path) -> None:
    """A quiet spare whose gate skip (a rest of 3 rounds) comes after its round closed at
    its target sits out the next rounds as if it had come in time, and the records of the
    rounds announced since say it rests. A notice for a round that did not select the
    device declares nothing."""
    import json

    from fedge.protocol import SkipNotice, Status, encode, encode_skip

    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=5, devices_per_round=2, overselect=1.5)
    devices = {d: Device(broker, d) for d in "abcde"}
    for d, dev in devices.items():
        quiet = Status(device_id=d, state="online", timestamp=0.0, quiet=True)
        dev.link.publish(T.status(d), encode(quiet), retain=True)
    pump(agg)
    rnd = agg.current
    assert rnd is not None and len(rnd.selected) == 3
    first, second, spare = sorted(rnd.selected)
    [other, *_] = sorted(set(devices) - set(rnd.selected))
    for d in (first, second):
        devices[d].send(1, delta(0.1), 10)
    pump(agg)
    clock.now += 1
    for d in (spare, other):
        notice = SkipNotice(
            device_id=d,
            round_id=1,
            update_id=f"{d}-skip-1".encode().hex()[:16],
            reason="small_update",
            trained=True,
            num_samples=10,
            rest=3,
        )
        devices[d].link.publish(T.update(d), encode_skip(notice))
    pump(agg)
    assert agg.inboxes.rest_until == {spare: 4}  # rounds 2, 3 and 4
    for round_id in (2, 3, 4):
        rnd = agg.current
        assert rnd is not None and rnd.round_id == round_id and spare not in rnd.selected
        answer_all_but(agg, clock, devices)
    # (Round 2 was announced before the notice came.)
    records = [json.loads(x) for x in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [r.get("resting") for r in records[1:4]] == [None, [spare], [spare]]

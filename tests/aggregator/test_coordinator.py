"""The round coordinator over the in-memory link, with a clock the test drives."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fedge.aggregator.config import AggregatorConfig
from fedge.aggregator.coordinator import Aggregator, describe_round
from fedge.aggregator.store import Store
from fedge.aggregator.strategies.config import StrategyConfig
from fedge.aggregator.strategies.robust import weighted_mean
from fedge.protocol import (
    Evaluation,
    GlobalModelHeader,
    MemoryBroker,
    MemoryLink,
    RoundAnnouncement,
    SkipNotice,
    Status,
    Topics,
    TrainingConfig,
    UpdateHeader,
    decode,
    encode,
    encode_skip,
)
from fedge.protocol.wire import publish_size
from helpers import DIGITS_MODEL

pytestmark = pytest.mark.link

FLEET = "unit"
T = Topics(FLEET)
STORES: list[Store] = []


@pytest.fixture(autouse=True)
def close_stores() -> Iterator[None]:
    """Python 3.13 warns (an error here) about an SQLite connection that is never closed."""
    yield
    while STORES:
        STORES.pop().close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def weights() -> dict[str, np.ndarray]:
    return {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}


def make(tmp_path: Path, broker: MemoryBroker, clock: Clock, **cfg: object) -> Aggregator:
    config = AggregatorConfig(
        fleet=FLEET,
        model=DIGITS_MODEL,
        state_dir=tmp_path,
        round_timeout=10.0,
        training=TrainingConfig(epochs=1, batch_size=4, lr=0.1, codec="float32"),
        strategy=StrategyConfig(name="fedavg"),
        **cfg,  # type: ignore[arg-type]
    )
    store = Store(tmp_path / "agg.sqlite")
    STORES.append(store)
    agg = Aggregator(
        config,
        link=MemoryLink(broker, "aggregator"),
        store=store,
        initial_weights=weights(),
        clock=clock,
    )
    agg.start()
    return agg


class Device:
    def __init__(self, broker: MemoryBroker, device_id: str) -> None:
        self.id = device_id
        self.link = MemoryLink(broker, device_id)
        self.link.connect()
        self.link.subscribe(T.round)
        self.link.subscribe(T.global_model)
        self.link.publish(
            T.status(device_id),
            encode(Status(device_id=device_id, state="online", timestamp=0.0)),
            retain=True,
        )

    def last(self, kind: type) -> object:
        found = None
        while (msg := self.link.get(0)) is not None:
            d = decode(msg.payload)
            if isinstance(d.msg, kind):
                found = d
        return found

    def send(
        self,
        round_id: int,
        delta: dict[str, np.ndarray],
        n: int,
        *,
        base: int = 0,
        update_id: str | None = None,
    ) -> str:
        uid = update_id or f"{self.id}-{round_id}"
        header = UpdateHeader(
            device_id=self.id, round_id=round_id, update_id=uid, base_version=base, num_samples=n
        )
        self.link.publish(T.update(self.id), encode(header, delta))
        return uid


def pump(agg: Aggregator) -> None:
    while (msg := agg.link.get(0)) is not None:
        agg.handle(msg)
    agg.tick()


def delta(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), value, np.float32), "b": np.full(3, value, np.float32)}


def test_round_completes_with_weighted_average(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=2, rounds=1)
    a, b = Device(broker, "a"), Device(broker, "b")
    pump(agg)
    ann = a.last(RoundAnnouncement).msg  # type: ignore[union-attr]
    assert ann.round_id == 1 and ann.selected == ("a", "b") and ann.model_version == 0
    a.send(1, delta(1.0), 30)
    pump(agg)
    assert agg.current is not None  # still waiting for b
    b.send(1, delta(-1.0), 10)
    pump(agg)
    assert agg.done and agg.version == 1
    np.testing.assert_allclose(agg.weights["w"], 0.5)  # (30*1 - 10*1) / 40
    g = a.last(GlobalModelHeader)
    assert g.msg.model_version == 1  # type: ignore[union-attr]
    np.testing.assert_allclose(g.tensors["b"], 0.5)  # type: ignore[union-attr]
    line = (tmp_path / "rounds.jsonl").read_text().splitlines()
    assert len(line) == 1 and '"participants": ["a", "b"]' in line[0]


def test_deadline_with_quorum_averages_what_arrived(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=3, quorum=0.5)
    devs = [Device(broker, d) for d in "abc"]
    pump(agg)
    devs[0].send(1, delta(2.0), 5)
    devs[1].send(1, delta(4.0), 15)
    pump(agg)
    assert agg.version == 0
    clock.now += 11
    pump(agg)
    assert agg.version == 1
    np.testing.assert_allclose(agg.weights["w"], 3.5)
    assert agg.current is not None and agg.current.round_id == 2  # next round announced


def test_deadline_without_quorum_fails_the_round(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=3, quorum=0.9)
    devs = [Device(broker, d) for d in "abc"]
    pump(agg)
    devs[0].send(1, delta(1.0), 5)
    clock.now += 11
    pump(agg)
    assert agg.version == 0
    lines = (tmp_path / "rounds.jsonl").read_text()
    assert '"status": "failed"' in lines and '"missing": ["b", "c"]' in lines


def test_rejects_are_counted_with_reasons(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=2)
    a, b = Device(broker, "a"), Device(broker, "b")
    pump(agg)
    outsider = Device(broker, "late")  # came online after the selection
    outsider.send(1, delta(1.0), 5)
    a.send(2, delta(1.0), 5)  # wrong round
    a.send(1, delta(1.0), 5, base=7)  # stale base model
    a.send(
        1, {"w": np.zeros((3, 3), np.float32), "b": np.zeros(3, np.float32)}, 5, update_id="shape"
    )
    nan = delta(1.0)
    nan["w"][0, 0] = np.nan
    a.send(1, nan, 5, update_id="nan")
    uid = b.send(1, delta(1.0), 5)
    b.send(1, delta(9.0), 5, update_id=uid)  # a duplicate id
    b.link.publish(
        T.update("a"),
        encode(
            UpdateHeader(device_id="b", round_id=1, update_id="x", base_version=0, num_samples=1),
            delta(0.0),
        ),
    )
    b.link.publish(T.update("b"), b"garbage, not an envelope")
    pump(agg)
    assert dict(agg.rejected) == {
        "not_selected": 1,
        "wrong_round": 1,
        "stale_base": 1,
        "bad_shape": 1,
        "not_finite": 1,
        "duplicate": 1,
        "topic_mismatch": 1,
        "bad_magic": 1,
    }
    assert agg.current.uploaded == {"b"}  # type: ignore[union-attr]


def test_skip_notice_counts_as_an_answer_not_a_dropout(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=3, rounds=1)
    a, b, c = Device(broker, "a"), Device(broker, "b"), Device(broker, "c")
    pump(agg)
    a.send(1, delta(1.0), 5)
    # b trained but held its small update back: a zero delta with its 15 samples;
    # c sat out (battery): it answered, but does not count in the average.
    held = SkipNotice(
        device_id="b",
        round_id=1,
        update_id="0b" * 8,
        reason="small_update",
        trained=True,
        num_samples=15,
    )
    sat = SkipNotice(device_id="c", round_id=1, update_id="0c" * 8, reason="battery_low")
    b.link.publish(T.update("b"), encode_skip(held))
    c.link.publish(T.update("c"), encode_skip(sat))
    pump(agg)  # all answered: no need to wait for the deadline
    assert agg.done and agg.version == 1
    np.testing.assert_allclose(agg.weights["w"], 0.25)  # (5 * 1 + 15 * 0) / 20
    line = json.loads((tmp_path / "rounds.jsonl").read_text())
    assert line["skipped"] == ["b", "c"] and line["participants"] == ["a"]
    assert line["skip_reasons"] == {"small_update": 1, "battery_low": 1}
    assert line["bytes_up_by_device"]["b"] == publish_size(T.update("b"), 22, 1)


def test_the_round_logs_the_devices_scores_weighted_by_what_each_scored(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=4, rounds=1)
    a, b, c, d = (Device(broker, x) for x in "abcd")
    pump(agg)

    def update(dev: Device, n: int, ev: Evaluation) -> None:
        header = UpdateHeader(
            device_id=dev.id,
            round_id=1,
            update_id=f"{dev.id}-1",
            base_version=0,
            num_samples=n,
            evaluation=ev,
        )
        dev.link.publish(T.update(dev.id), encode(header, delta(0.0)))

    update(a, 90, Evaluation(count=10, loss=1.0, accuracy=0.5))
    update(c, 20, Evaluation(count=21, loss=0.0, accuracy=0.0))  # more than it trained on
    held = SkipNotice(
        device_id="b",
        round_id=1,
        update_id="0b" * 8,
        reason="small_update",
        trained=True,
        num_samples=270,
        evaluation=Evaluation(count=30, loss=0.2, accuracy=0.9),
    )
    b.link.publish(T.update("b"), encode_skip(held))
    d.send(1, delta(0.0), 10)  # an older agent: no evaluation
    clock.now += 11  # c's answer was refused: the deadline closes the round
    pump(agg)
    assert agg.rejected["bad_evaluation"] == 1
    line = json.loads((tmp_path / "rounds.jsonl").read_text())
    assert line["fed_eval"] == {
        "model_version": 0,  # the model the round announced, not the one it made
        "devices": 2,
        "count": 40,
        "loss": pytest.approx(0.4),
        "accuracy": pytest.approx(0.8),
    }
    assert "fed eval accuracy 80.00% of v0 (n=40)" in describe_round(line)


def test_restart_resumes_from_the_stored_model(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=1)
    a = Device(broker, "a")
    pump(agg)
    a.send(1, delta(1.0), 5)
    pump(agg)  # round 1 done, round 2 open
    assert agg.version == 1 and agg.current is not None
    agg.store.close()
    agg.link.close()
    again = make(tmp_path, broker, clock, min_devices=1)
    assert again.version == 1
    np.testing.assert_allclose(again.weights["w"], 1.0)
    assert again.next_round_id == 3  # round 2 was abandoned, not reused
    g = Device(broker, "b").last(GlobalModelHeader)
    assert g.msg.model_version == 1  # type: ignore[union-attr]


def test_messages_of_other_fleets_are_ignored_quietly(tmp_path: Path) -> None:
    """A broker that hands out retained messages of other topics must not disturb a round."""
    from fedge.protocol import Message

    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=1)
    other = Topics("other-fleet")
    status = Status(device_id="x", state="online", timestamp=0.0)
    agg.handle(Message(other.status("x"), encode(status), retain=True))
    agg.handle(Message(T.round, b"our own retained announcement", retain=True))
    assert agg.rejected == {"unexpected_topic": 2}
    assert agg.online == set()


def test_held_back_updates_count_towards_the_quorum(tmp_path: Path) -> None:
    """One upload, two devices that trained but held back, one silent: the round goes on."""
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=4, quorum=0.75)
    devs = [Device(broker, d) for d in "abcd"]
    pump(agg)
    devs[0].send(1, delta(4.0), 10)
    for dev in devs[1:3]:
        held = SkipNotice(
            device_id=dev.id,
            round_id=1,
            update_id=dev.id * 16,
            reason="small_update",
            trained=True,
            num_samples=10,
        )
        dev.link.publish(T.update(dev.id), encode_skip(held))
    pump(agg)
    clock.now += 11
    pump(agg)
    assert agg.version == 1
    np.testing.assert_allclose(agg.weights["w"], 4.0 / 3)  # 10 * 4 / (10 + 10 + 10)


def test_absurd_numbers_from_a_device_are_rejected_not_fatal(tmp_path: Path) -> None:
    """Ints beyond 32 bits would overflow SQLite; the schema refuses them at the door."""
    from fedge.protocol import Message

    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=1)
    Device(broker, "a")
    pump(agg)
    forged = UpdateHeader.model_construct(  # what a rogue device could put on the wire
        kind="update",
        device_id="a",
        round_id=2**63,
        update_id="x1",
        base_version=0,
        num_samples=2**70,
        codec="float32",
        train_loss=None,
    )
    bad = encode(forged, delta(1.0))
    agg.handle(Message(T.update("a"), bad))
    assert agg.rejected["schema"] == 1 and agg.current is not None


def test_a_failed_store_write_leaves_the_previous_state(tmp_path: Path) -> None:
    """Model, strategy state and round record commit together or not at all."""
    import sqlite3

    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=1)
    a = Device(broker, "a")
    pump(agg)
    a.send(1, delta(1.0), 5)

    def broken(*args: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    agg.store.close_round = broken  # type: ignore[method-assign]
    with pytest.raises(sqlite3.OperationalError):
        pump(agg)
    assert agg.store.latest_model()[0] == 0  # type: ignore[index]  # v1 was rolled back


def test_bytes_are_credited_to_the_round_they_are_for(tmp_path: Path) -> None:
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=1, rounds=1)
    a = Device(broker, "a")
    pump(agg)
    a.send(7, delta(1.0), 5)  # a straggler for some other round
    a.link.publish(T.update("a"), b"garbage, not an envelope")
    pump(agg)
    stray = agg.stray_bytes
    assert stray > 0
    a.send(1, delta(1.0), 5)
    pump(agg)
    line = json.loads((tmp_path / "rounds.jsonl").read_text())
    assert line["bytes_up_by_device"] == {"a": line["bytes_received"]}
    assert agg.stray_bytes == stray  # the round's own update went to the round
    assert line["bytes_received"] < stray  # the straggler and the garbage were not counted


def test_each_round_is_one_short_line_an_operator_reads() -> None:
    done = {
        "round": 12,
        "status": "done",
        "model_version": 12,
        "selected": 10,
        "participants": [f"d{i}" for i in range(8)],
        "skipped": ["d8"],
        "skip_reasons": {"small_update": 1},
        "missing": ["d9"],
        "accuracy": 0.9621,
        "loss": 0.3105,
        "bytes_received": 24130,
        "bytes_down_per_device": 20117,
        "duration_s": 4.12,
    }
    assert describe_round(done) == (
        "round 12 done: 8 of 10 trained, 1 skipped (small_update 1), 1 missing (d9);"
        " accuracy 96.21%, loss 0.3105; up 24.1 kB, down 20.1 kB per device; 4.1 s; model v12"
    )
    failed = {
        "round": 3,
        "status": "failed",
        "why": "1 of 3 update(s) by the deadline, quorum 2",
        "model_version": 2,
        "selected": 3,
        "participants": ["a"],
        "skipped": [],
        "missing": ["b", "c"],
        "bytes_received": 900,
        "bytes_down_per_device": 20117,
        "duration_s": 60.0,
    }
    assert describe_round(failed) == (
        "round 3 failed (1 of 3 update(s) by the deadline, quorum 2): 1 of 3 trained,"
        " 2 missing (b, c); up 0.9 kB, down 20.1 kB per device; 60.0 s; model v2"
    )
    assert len(describe_round(done)) < 200
    scored = done | {
        "fed_eval": {"model_version": 11, "devices": 8, "count": 340, "loss": 0.3, "accuracy": 0.95}
    }
    assert describe_round(scored) == describe_round(done).replace(
        "; up", "; fed eval accuracy 95.00% of v11 (n=340); up"
    )


def test_the_streamed_average_equals_the_list_average_with_a_clipped_liar(
    tmp_path: Path,
) -> None:
    """Updates are folded into a running sum as they arrive; a count clipped at the close
    (3x the round's median) is corrected from the delta kept in the store."""
    broker, clock = MemoryBroker(), Clock()
    agg = make(tmp_path, broker, clock, min_devices=4, rounds=1)
    devices = [Device(broker, d) for d in ("a", "b", "c", "liar")]
    pump(agg)
    rng = np.random.default_rng(4)
    sent = {
        d.id: {k: rng.normal(0, 1, w.shape).astype(np.float32) for k, w in weights().items()}
        for d in devices
    }
    counts = {"a": 30, "b": 50, "c": 40, "liar": 10**6}
    for d in devices:
        d.send(1, sent[d.id], counts[d.id])
        pump(agg)
    assert agg.done and agg.version == 1
    used = counts | {"liar": 3 * 40}  # clipped to 3x the lower median of the round
    order = sorted(sent)
    want = weighted_mean([sent[d] for d in order], [used[d] for d in order])
    for name, w in agg.weights.items():
        np.testing.assert_allclose(w, (weights()[name] + want[name]).astype(np.float32), atol=1e-7)
